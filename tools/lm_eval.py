"""``python -m tools.lm_eval ARGS...``: lm-eval's own command line, with the ``sublayer`` model registered.

lm-eval 0.4.13 never reads ``lm_eval.models`` entry points, so ``lm_eval --model sublayer`` cannot find
an installed adapter. This wrapper imports ``tools.lm_eval_adapter`` (which registers ``sublayer``) and
then runs lm-eval's CLI with the same arguments, e.g.

    HF_DATASETS_OFFLINE=1 python -m tools.lm_eval --model sublayer \\
        --model_args pretrained=smollm2-135m-instruct,plan=attn66,dtype=float32,batch_size=8 \\
        --include_path ../shared/data/lm_eval_tasks --tasks arc_easy_local,hellaswag_local --limit 100

The local task YAMLs read their data from ``../shared/data/...``: start it from the project root.
"""

import sys

from model.errors import cli_main


@cli_main
def main(argv=None) -> int:
    import tools.lm_eval_adapter  # noqa: F401  (registers "sublayer")
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval"] + (list(sys.argv[1:]) if argv is None else list(argv))
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
