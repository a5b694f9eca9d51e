"""Tokenizer of a checkpoint: ``tokenizer.json`` (tokenizers) or ``tokenizer.model`` (sentencepiece).

BOS/EOS follow the checkpoint's ``tokenizer_config.json``: when it sets ``add_bos_token`` /
``add_eos_token`` those decide; otherwise ``tokenizer.json``'s own post-processor does.
Chat templates come from ``tokenizer_config.json`` or ``chat_template.jinja`` and are rendered with jinja2.
"""

import json
from pathlib import Path

from model.errors import UserError


def _token_text(value):
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, checkpoint_dir, bos_token_id=None, eos_token_ids=()):
        d = Path(checkpoint_dir)
        cfg_path = d / "tokenizer_config.json"
        try:
            self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        except (OSError, ValueError) as e:
            raise UserError(f"{cfg_path}: not readable JSON ({e})") from None
        self._sp = self._tok = None
        if (d / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer
            try:
                self._tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
            except Exception as e:
                raise UserError(f"{d / 'tokenizer.json'}: not a readable tokenizer ({e})") from None
        elif (d / "tokenizer.model").is_file():
            import sentencepiece
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
        else:
            raise UserError(f"{d}: no tokenizer.json or tokenizer.model")

        bos_text = _token_text(self.config.get("bos_token"))
        eos_text = _token_text(self.config.get("eos_token"))
        self.bos_id = self._id(bos_text) if bos_text else bos_token_id
        eos = [self._id(eos_text)] if eos_text else []
        self.eos_ids = tuple(dict.fromkeys([i for i in eos + list(eos_token_ids) if i is not None]))
        self.add_bos = self.config.get("add_bos_token", None if self._tok else True)
        self.add_eos = self.config.get("add_eos_token", None if self._tok else False)
        pad_text = _token_text(self.config.get("pad_token"))
        pad = self._id(pad_text) if pad_text else None
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)

        template = self.config.get("chat_template")
        if template is None and (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text()
        self.chat_template = template
        self._bos_text, self._eos_text = bos_text or "", eos_text or ""

    def _id(self, text):
        if self._tok is not None:
            return self._tok.token_to_id(text)
        i = self._sp.piece_to_id(text)
        return None if i == self._sp.unk_id() and text != self._sp.id_to_piece(i) else i

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size() if self._tok is not None else self._sp.get_piece_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, with BOS/EOS as the checkpoint's tokenizer config says."""
        if self._tok is not None:
            if self.add_bos is None and self.add_eos is None:
                return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
            ids = self._tok.encode(text, add_special_tokens=False).ids
        else:
            ids = self._sp.encode(text)
        if add_special_tokens:
            if self.add_bos and self.bos_id is not None:
                ids = [self.bos_id] + ids
            if self.add_eos and self.eos_ids:
                ids = ids + [self.eos_ids[0]]
        return ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self._tok is not None:
            return self._tok.decode(ids, skip_special_tokens=True)
        special = {self.bos_id, *self.eos_ids}
        return self._sp.decode([i for i in ids if i not in special])

    def token_text(self, token_id: int) -> str:
        """One token's text with special tokens kept (as HF ``decode([id])``)."""
        if self._tok is not None:
            return self._tok.decode([int(token_id)], skip_special_tokens=False)
        return self._sp.id_to_piece(int(token_id))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render the checkpoint's chat template (jinja2), as transformers does."""
        if not self.chat_template:
            raise UserError("--chat: this checkpoint has no chat template "
                            "(tokenizer_config.json 'chat_template' or chat_template.jinja)")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self._bos_text, eos_token=self._eos_text)

    def encode_chat(self, prompt: str) -> list[int]:
        """Ids of a one-turn chat; the template writes the special tokens itself."""
        text = self.apply_chat_template([{"role": "user", "content": prompt}])
        return self.encode(text, add_special_tokens=False)
