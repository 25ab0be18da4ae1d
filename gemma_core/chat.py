"""A multi-turn chat that keeps its KV cache between turns: each turn feeds only the new tokens."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gemma_core.errors import InputError
from gemma_core.generation import StepEvent, default_eos_ids
from gemma_core.model import Model
from gemma_core.tokenizer import render_chat


class ChatSession:
    """Turns rendered with the tokenizer's Gemma chat format; the cache holds the conversation."""

    def __init__(self, model: Model, *, system: str | None = None, context: int = 4096) -> None:
        if model.tokenizer is None:
            raise InputError("chat: this model has no tokenizer")
        self.model, self.system = model, system
        self.context = min(context, model.config.max_position_embeddings)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation."""
        self.messages: list[dict[str, str]] = []
        self.cache: Any = None
        self._unfed: int | None = None  # the last generated token, not yet in the cache

    def send(self, text: str, *, max_new_tokens: int = 256,
             streamer: Callable[[StepEvent], Any] | None = None, **sampling: Any) -> str:
        """Add a user turn, generate the model's reply, and return its text. A turn that fails
        after its prompt reached the model (a streamer that raises) forgets the conversation:
        the cache was updated in place."""
        if not text.strip():
            raise InputError("message: empty")
        tok = self.model.tokenizer
        assert tok is not None
        if self.cache is None:
            first = ([{"role": "system", "content": self.system}] if self.system else [])
            rendered = render_chat([*first, {"role": "user", "content": text}], tok.chat_format, True,
                                   bos=tok.sp.id_to_piece(tok.bos_id))
            ids = tok.encode(rendered, add_special_tokens=False)
            self.cache = self.model.new_cache(1, self.context)
        else:
            stops = set(default_eos_ids(self.model))
            carry = [] if self._unfed is None or self._unfed in stops else [self._unfed]
            turn = f"<end_of_turn>\n<start_of_turn>user\n{text.strip()}<end_of_turn>\n<start_of_turn>model\n"
            ids = carry + tok.encode(turn, add_special_tokens=False)
        # the session owns its cache: hand it over (updated in place), keep the one returned
        try:
            result = self.model.generate([ids], max_new_tokens=max_new_tokens, cache=self.cache,
                                         donate_cache=True, streamer=streamer, **sampling)
        except BaseException:
            if self.cache.spent or not self.messages:  # (a failed first turn: start afresh)
                self.reset()
            raise
        self.cache = result.cache
        generated = result.token_ids[0]
        self._unfed = generated[-1] if generated else None
        reply = result.texts[0] if result.texts else ""
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        return reply
