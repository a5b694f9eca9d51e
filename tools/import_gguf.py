"""Import a llama GGUF into a Hugging Face-style checkpoint directory.

    python -m tools.import_gguf GGUF_PATH --out DIR [--force] [--keep-quant]

Writes config.json, model.safetensors (float32), generation_config.json and the tokenizer files.
--keep-quant keeps Q8_0 / Q4_0 / Q4_1 matrices as their blocks (int8 / int4 with float16 scales and
offsets, read by `runtime.load` without expanding them to float); other types are dequantized as
without it, and norms stay float32.
DIR must be missing or empty unless --force; it is replaced only once the import has finished (the
old DIR moved aside, the new one renamed in, the old one removed). DIR may not be, contain or sit
inside the GGUF's location. Modes follow the umask; temporaries of killed runs are removed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.errors import cli_main


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.import_gguf", description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path, metavar="GGUF_PATH", help="the .gguf file (architecture llama)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="checkpoint directory to write (never the GGUF's own directory or one around it)")
    parser.add_argument("--force", action="store_true",
                        help="replace DIR if it exists and is not empty, once the new one is complete")
    parser.add_argument("--keep-quant", action="store_true",
                        help="keep Q8_0/Q4_0/Q4_1 weights as blocks instead of dequantizing them to float32")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from model.gguf import import_gguf

    path = import_gguf(args.gguf, args.out, show_progress=not args.quiet, overwrite=args.force,
                       keep_quant=args.keep_quant)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
