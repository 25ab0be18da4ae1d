"""The Hugging Face tokenizer and generation files of a folder converted from a source that has
none (a GGUF, keras-hub preset, Flax tree or gemma_pytorch checkpoint): what `transformers`
needs to tokenize and generate exactly as gemma_core does.

- `tokenizer_config.json`: BOS added, EOS not (transformers adds no BOS to a bare
  `tokenizer.model`), the special tokens, `GemmaTokenizer`, `model_max_length`, the chat template
  of the hub's instruction models (Gemma 1/2 or Gemma 3, as `GemmaTokenizer.chat_format`
  decides), and `added_tokens_decoder`: every CONTROL/USER_DEFINED piece as an added token,
  `special` as `GemmaTokenizer.is_special` says, so that `skip_special_tokens` skips the same ids.
- `special_tokens_map.json`: bos, eos, pad, unk.
- `generation_config.json`: bos/pad ids and the eos ids gemma_core stops at (the config's, the
  tokenizer's eos and `<end_of_turn>`: google/gemma-3 writes `[1, 106]`), with transformers'
  key names (one id as a number, several as a list). No sampling settings: greedy by default.

An HF source's own files are copied verbatim instead (convert.HF_FILES).
"""

from __future__ import annotations

import json
from typing import Any

from gemma_core.config import GemmaConfig

# google/gemma-7b-it and google/gemma-2-*-it, tokenizer_config.json "chat_template"
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/"
    "user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' "
    "%}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
    "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\n'}}{% endif %}"
)

# google/gemma-3-*-it, tokenizer_config.json "chat_template"
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

CHAT_TEMPLATES = {"gemma": GEMMA_CHAT_TEMPLATE, "gemma3": GEMMA3_CHAT_TEMPLATE}


def _json(value: dict[str, Any]) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()


def _ids(ids: list[int]) -> int | list[int]:
    return ids[0] if len(ids) == 1 else ids


def generation_config(config: GemmaConfig, tokenizer: Any = None) -> dict[str, Any]:
    """transformers' generation config: bos/pad and the eos ids `gemma generate` stops at."""
    eos = list(config.eos_token_ids)
    if tokenizer is not None:
        eos += [tokenizer.eos_id, tokenizer.end_of_turn_id]
    eos = [i for i in eos if i is not None]
    return {"bos_token_id": config.bos_token_id, "eos_token_id": _ids(list(dict.fromkeys(eos))),
            "pad_token_id": config.pad_token_id}


def tokenizer_config(config: GemmaConfig, tokenizer: Any) -> dict[str, Any]:
    """tokenizer_config.json for `tokenizer` (a GemmaTokenizer)."""
    import importlib

    pb: Any = importlib.import_module("sentencepiece.sentencepiece_model_pb2")
    kinds = pb.ModelProto.SentencePiece
    proto = pb.ModelProto()
    proto.ParseFromString(tokenizer.sp.serialized_model_proto())
    piece = tokenizer.sp.id_to_piece
    added = {str(i): {"content": p.piece, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": tokenizer.is_special(i)}
             for i, p in enumerate(proto.pieces)
             if p.type in (kinds.CONTROL, kinds.USER_DEFINED, kinds.UNKNOWN)}
    out: dict[str, Any] = {
        "add_bos_token": bool(tokenizer.add_bos), "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": piece(tokenizer.bos_id), "eos_token": piece(tokenizer.eos_id),
        "pad_token": piece(tokenizer.pad_id), "unk_token": piece(tokenizer.unk_id),
        "clean_up_tokenization_spaces": False, "model_max_length": config.max_position_embeddings,
        "padding_side": "left", "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer", "use_default_system_prompt": False,
    }
    if tokenizer.start_of_turn_id is not None and tokenizer.end_of_turn_id is not None:
        out["chat_template"] = CHAT_TEMPLATES[tokenizer.chat_format]
    return out


def hf_files(config: GemmaConfig, tokenizer_model: bytes | None) -> dict[str, bytes]:
    """{file name: bytes} of the files above (only generation_config.json without a tokenizer)."""
    if tokenizer_model is None:
        return {"generation_config.json": _json(generation_config(config))}
    from gemma_core.tokenizer import GemmaTokenizer

    tok = GemmaTokenizer(tokenizer_model)
    piece = tok.sp.id_to_piece
    special = {"bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id),
               "pad_token": piece(tok.pad_id), "unk_token": piece(tok.unk_id)}
    return {"tokenizer_config.json": _json(tokenizer_config(config, tok)),
            "special_tokens_map.json": _json(special),
            "generation_config.json": _json(generation_config(config, tok))}
