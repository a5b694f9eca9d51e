"""Import a llama GGUF into a Hugging Face-style checkpoint directory.

    python -m tools.import_gguf GGUF_PATH --out DIR [--force]

Writes config.json, model.safetensors (float32), generation_config.json and the tokenizer files.
DIR must be missing or empty unless --force; it is replaced only once the import has finished.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.import_gguf", description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path, metavar="GGUF_PATH", help="the .gguf file (architecture llama)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="checkpoint directory to write")
    parser.add_argument("--force", action="store_true", help="replace DIR if it exists and is not empty")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    try:
        out = args.out.expanduser()
        if out.exists() and not out.is_dir():
            raise UserError(f"{out}: exists and is not a directory")
        if out.is_dir() and any(out.iterdir()) and not args.force:
            raise UserError(f"{out}: already exists and is not empty (pass --force to replace it)")
        from model.gguf import import_gguf

        path = import_gguf(args.gguf, out, show_progress=not args.quiet, overwrite=args.force)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
