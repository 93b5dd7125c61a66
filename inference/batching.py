"""Continuous batching for the server: every open request shares one decoding forward per token.

Continuous (iteration-level) batching, as in Orca (Yu et al., OSDI 2022) and vLLM: a new request joins
the running batch at the next token boundary, and a finished one leaves at once, instead of waiting for
a whole batch to end. On a CPU or GPU one decoding step of 8 rows costs little more than one of 1 row
(the weights are read once either way), so the total tokens per second grow with the clients.

    batcher = Batcher(chat)                          # starts the decoding thread
    for event in batcher.stream(prompt_ids, max_tokens=64, temperature=0):
        print(event["delta"], end="")               # the same events as chat_core.stream_reply

How the rows share a KV cache: a new request's prompt is run alone (its own prefill, exactly as it would
be one at a time), then its keys/values join the batch cache, left-padded to a common length; a 0/1
attention mask keeps every row off its padding, and each row has its own position. Each request keeps
its own sampling settings, seed (its own generator), stop strings and max_tokens.
"""
import queue
import threading

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from inference.chat_core import ReplyText, TokenSampler


class Request:
    def __init__(self, prompt_ids, reply, sample):
        self.prompt_ids, self.reply, self.sample = prompt_ids, reply, sample
        self.events = queue.Queue()  # what the decoding thread hands to the request's thread
        self.cancelled = False       # set when the client goes away: the row leaves at the next token
        self.next_token = None


class Batcher:
    """One decoding thread for a ChatModel; stream() may be called from many threads at once."""

    def __init__(self, chat, max_batch=16, start_thread=True):
        """start_thread=False: the caller runs run_forever() itself, best in the thread that loaded the model.
        (Measured with torch 2.13's CPU build: once one thread has run parallel CPU ops, another thread's ops
        run at about half speed, 50 instead of 110 tokens/s for 512x8, so the server decodes in its main thread.)"""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.chat, self.max_batch = chat, max_batch
        self.waiting = queue.Queue()
        self.rows = []                  # the running requests, in batch order
        self.cache = None               # their KV cache: per layer [rows, kv_heads, T, head_dim], left-padded
        self.mask = None                # [rows, T]: 1 = a real token, 0 = left padding
        self.swap = None                # (model, event) from swap_model, waiting for the running rows to finish
        if start_thread:
            threading.Thread(target=self.run_forever, daemon=True, name="minimind-batcher").start()

    def stream(self, prompt_ids, max_tokens, temperature=0.85, top_p=0.85, stop=(), seed=None):
        """Yield the reply's events (see chat_core.ReplyText) while other requests share the forwards."""
        return self.events(self.submit(prompt_ids, max_tokens, temperature, top_p, stop, seed))

    def submit(self, prompt_ids, max_tokens, temperature=0.85, top_p=0.85, stop=(), seed=None, top_k=0,
               stop_token_ids=()):
        """Queue a request now (so several submitted together decode together); read it with events()."""
        request = Request(list(prompt_ids), ReplyText(self.chat.tokenizer, max_tokens, stop, stop_token_ids),
                          TokenSampler(temperature, top_p, seed, self.chat.device, top_k))
        self.waiting.put(request)
        return request

    @staticmethod
    def events(request):
        """A submitted request's events; the last one also holds the generated token_ids and their logprobs (each
        under the distribution it was sampled from). Closing this early takes the request out of the batch."""
        try:
            while True:
                event = request.events.get()
                if isinstance(event, BaseException):
                    raise event
                if "finish_reason" in event:  # the decoding thread is done with the request: its lists are final
                    yield dict(event, token_ids=request.reply.generated, logprobs=request.sample.logprobs)
                    return
                yield event
        finally:
            request.cancelled = True

    def swap_model(self, model):
        """Serve with `model` from now on (new weights, same tokenizer): the requests already running or queued
        finish on the old weights, later ones start on the new. Returns once the decoding thread has swapped."""
        swapped = threading.Event()
        self.waiting.put((model, swapped))
        swapped.wait()

    # -- the decoding thread -----------------------------------------------------------------
    def run_forever(self):
        """The decoding loop: admit waiting requests, one decoding step for all, repeat."""
        while True:
            try:
                self._admit()
                self._decode_step()
            except Exception as error:  # a failed decoding step: every running request gets the error, the loop goes on
                for request in self.rows:
                    request.events.put(error)
                self.rows, self.cache, self.mask = [], None, None

    def _give(self, request, token):
        """Hand the token's events to the request; True while the request goes on."""
        for event in request.reply.add(token):
            request.events.put(event)
        request.next_token = token
        return not request.reply.finished and not request.cancelled

    @torch.no_grad()
    def _admit(self):
        """Prefill waiting requests (blocking when nothing runs) and add them to the batch."""
        while len(self.rows) < self.max_batch:
            if self.swap is not None:  # new weights: admitted only once the rows before them have finished
                if self.rows:
                    return
                self.chat.model, swapped = self.swap
                self.swap = None
                swapped.set()
            try:
                request = self.waiting.get(block=not self.rows)
            except queue.Empty:
                return
            if isinstance(request, tuple):  # from swap_model
                self.swap = request
                continue
            if request.cancelled:
                continue
            cache = DynamicCache(config=self.chat.model.config)
            prompt = torch.tensor([request.prompt_ids], device=self.chat.device)
            try:
                logits = self.chat.model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
                if self._give(request, request.sample(logits[:, -1].float())):
                    self._join(request, cache)
            except Exception as error:  # e.g. out of memory on a long prompt: this request fails, the batch goes on
                request.events.put(error)

    def _cache_of(self, layers):
        """A DynamicCache holding these per-layer (keys, values) (made through its public update())."""
        cache = DynamicCache(config=self.chat.model.config)
        for i, (k, v) in enumerate(layers):
            cache.update(k, v, i)
        return cache

    @staticmethod
    def _layers_of(cache):
        return [(layer.keys, layer.values) for layer in cache.layers if layer.keys is not None]

    def _join(self, request, cache):
        """Append one prefilled request to the batch cache, left-padding the shorter side to a common length."""
        new_len = len(request.prompt_ids)
        if not self.rows:
            self.cache, self.mask = cache, torch.ones(1, new_len, dtype=torch.long, device=self.chat.device)
        else:
            old_len = self.mask.shape[1]
            width = max(old_len, new_len)

            def left_pad(t, n):  # n zero columns before the time axis (dim -2 of keys/values, -1 of the mask)
                return F.pad(t, (0, 0, n, 0)) if t.dim() == 4 else F.pad(t, (n, 0))
            self.cache = self._cache_of([(torch.cat([left_pad(k, width - old_len), left_pad(k1, width - new_len)]),
                                          torch.cat([left_pad(v, width - old_len), left_pad(v1, width - new_len)]))
                                         for (k, v), (k1, v1) in zip(self._layers_of(self.cache), self._layers_of(cache))])
            new_mask = torch.ones(1, new_len, dtype=torch.long, device=self.mask.device)
            self.mask = torch.cat([left_pad(self.mask, width - old_len), left_pad(new_mask, width - new_len)])
        self.rows.append(request)

    @torch.no_grad()
    def _decode_step(self):
        """One forward of every running row's last token on the shared cache; then rows that ended leave."""
        if not self.rows:
            return
        device = self.chat.device
        tokens = torch.tensor([[r.next_token] for r in self.rows], device=device)
        positions = self.mask.sum(dim=1, keepdim=True)  # a row's next position = its real tokens so far
        self.mask = F.pad(self.mask, (0, 1), value=1)
        logits = self.chat.model(tokens, attention_mask=self.mask, position_ids=positions, past_key_values=self.cache,
                                 use_cache=True, logits_to_keep=1).logits[:, -1].float()  # the cache grows by a column
        keep = [i for i, r in enumerate(self.rows) if self._give(r, r.sample(logits[i:i + 1]))]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(keep, device=device)
        self.mask = self.mask[index]
        first = int(self.mask.any(dim=0).nonzero()[0])  # columns that are padding in every remaining row go
        self.mask = self.mask[:, first:]
        self.cache = self._cache_of([(k[index, :, first:], v[index, :, first:]) for k, v in self._layers_of(self.cache)])
