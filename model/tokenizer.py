"""Tokenizer of a checkpoint: ``tokenizer.json`` (tokenizers) or ``tokenizer.model`` (sentencepiece).

BOS/EOS follow the checkpoint's ``tokenizer_config.json``: when it sets ``add_bos_token`` /
``add_eos_token`` those decide; otherwise ``tokenizer.json``'s own post-processor does.
Chat templates come from ``tokenizer_config.json`` or ``chat_template.jinja`` and are rendered with jinja2.
"""

from pathlib import Path

from model.config import check_type, shown
from model.errors import UserError, read_json


def _token_text(config: dict, key: str, where: str) -> str | None:
    """A special token's text: a string, ``{"content": string}`` (AddedToken form) or null."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise UserError(f"{where}: field '{key}' must be a token string, {{\"content\": string}} or null, "
                        f"got {shown(config.get(key))}")
    return value or None


def _chat_template(config: dict, where: str, jinja_file: Path) -> tuple[str | None, str]:
    """(template text or None, where it came from): tokenizer_config.json's 'chat_template' (a string, or
    transformers' list of {"name", "template"} from which "default" is used), else chat_template.jinja."""
    template = config.get("chat_template")
    source = f"{where} field 'chat_template'"
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", ...)
        if template is ...:
            raise UserError(f"{source}: a list of templates needs one named 'default', got {shown(config['chat_template'])}")
    if template is not None and not isinstance(template, str):
        raise UserError(f"{source}: must be a template string, got {shown(template)}")
    if template is None and jinja_file.is_file():
        try:
            template, source = jinja_file.read_text(encoding="utf-8"), str(jinja_file)
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{jinja_file}: not readable text ({e})") from None
    return template, source


class Tokenizer:
    def __init__(self, checkpoint_dir, bos_token_id=None, eos_token_ids=()):
        d = Path(checkpoint_dir)
        cfg_path = d / "tokenizer_config.json"
        where = str(cfg_path)
        self.config = read_json(cfg_path) if cfg_path.is_file() else {}
        check_type(self.config, dict, where, "(top level)", "a JSON object")
        self._sp = self._tok = None
        if (d / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer
            try:
                self._tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
            except Exception as e:
                raise UserError(f"{d / 'tokenizer.json'}: not a readable tokenizer ({e})") from None
        elif (d / "tokenizer.model").is_file():
            import sentencepiece
            try:
                self._sp = sentencepiece.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
            except Exception as e:  # sentencepiece raises RuntimeError/OSError for a corrupt model
                raise UserError(f"{d / 'tokenizer.model'}: not a readable SentencePiece model ({e})") from None
        else:
            raise UserError(f"{d}: no tokenizer.json or tokenizer.model")

        bos_text = _token_text(self.config, "bos_token", where)
        eos_text = _token_text(self.config, "eos_token", where)
        self.bos_id = self._id(bos_text) if bos_text else bos_token_id
        eos = [self._id(eos_text)] if eos_text else []
        self.eos_ids = tuple(dict.fromkeys([i for i in eos + list(eos_token_ids) if i is not None]))
        flags = []
        for key, default in (("add_bos_token", None if self._tok else True), ("add_eos_token", None if self._tok else False)):
            flags.append(check_type(self.config.get(key, default), (bool, type(None)), where, key, "true, false or null"))
        self.add_bos, self.add_eos = flags
        pad_text = _token_text(self.config, "pad_token", where)
        pad = self._id(pad_text) if pad_text else None
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)

        self.chat_template, self._template_source = _chat_template(self.config, where, d / "chat_template.jinja")
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
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self._bos_text, eos_token=self._eos_text)
        except Exception as e:  # jinja2's TemplateError kinds, or whatever the template's own code raises
            raise UserError(f"{self._template_source}: the chat template does not render "
                            f"({type(e).__name__}: {e})") from None

    def encode_chat(self, prompt: str) -> list[int]:
        """Ids of a one-turn chat; the template writes the special tokens itself."""
        text = self.apply_chat_template([{"role": "user", "content": prompt}])
        return self.encode(text, add_special_tokens=False)
