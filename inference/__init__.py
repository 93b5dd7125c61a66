"""What the chat entry points share (eval_llm.py, scripts/serve_openai_api.py, scripts/web_demo.py and the
evaluators): which weight a command line means (paths.py), loading it and streaming replies (chat_core.py), the
server's continuous batching (batching.py) and the offline tools a model may call (tools.py)."""
