"""Answering prompts with a model (and optionally an adapter), streaming tokens as they come."""

from __future__ import annotations

import sys
from typing import TextIO

import torch
from torch import nn
from transformers import TextStreamer

from splice.core.io import load_adapter
from splice.core.merging import merge_adapter
from splice.models import load_model
from splice.train.data import render_prompt


def load_for_inference(model_name: str, adapter: str | None = None, merge: bool = False):
    """(model, tokenizer) with the adapter attached, and folded into the weights with `merge`."""
    model, tokenizer = load_model(model_name)
    if adapter:
        load_adapter(model, adapter)
        if merge:
            merge_adapter(model)
    return model, tokenizer


class _Stream(TextStreamer):
    """Writes decoded text to a file object instead of print's stdout, flushing each piece."""

    def __init__(self, tokenizer, out: TextIO) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out
        self.pieces: list[str] = []

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.pieces.append(text)
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


@torch.inference_mode()
def generate_reply(model: nn.Module, tokenizer, prompt: str, *, max_new_tokens: int = 128,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                   out: TextIO | None | str = "stdout") -> str:
    """Answer `prompt` (as a chat user turn when the tokenizer has a template); greedy when
    temperature is 0. Tokens stream to `out` as they are produced; the full reply is returned."""
    model.eval()
    out = sys.stdout if out == "stdout" else out  # looked up per call, so redirection works
    ids = torch.tensor([render_prompt(tokenizer, prompt)])  # (1, T)
    streamer = _Stream(tokenizer, out) if out is not None else None
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False}
    torch.manual_seed(seed)
    output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            streamer=streamer, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                            **sampling)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()
