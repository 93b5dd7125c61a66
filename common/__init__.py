"""Helpers shared by training and inference, below both: devices and precision (device.py), command-line help
(cli.py), which tokenizer a weight reads and the record saved beside it (tokenizer.py), the chat format - rendering,
the thinking switch, reading a reply (chat.py) -, files written atomically (files.py), and measurement for the
benchmarks (bench.py)."""
