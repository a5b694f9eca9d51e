"""The lm-eval adapter against lm-eval's own HFLM on the same checkpoint (float32, CPU).

Per-request log-likelihoods within 1e-3 and identical is_greedy, rolling log-likelihoods within 1e-3,
greedy generate_until outputs identical (direct requests and a small local generation task run
through lm-eval end to end), plans against HF with the dropped modules zeroed, and clear errors for
bad model_args. Mostly on stories260K (tiny); one check on SmolLM2.
"""

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

import tools.lm_eval_adapter as adapter  # noqa: E402
from model.errors import UserError  # noqa: E402
from bench.hf_reference import SHARED, STORIES, skip_sublayers  # noqa: E402

TOL = 1e-3


def _hflm(path, **kw):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(path), dtype="float32", device="cpu", **kw)


def _ours(path, **kw):
    return adapter.SublayerLM(pretrained=str(path), dtype="float32", device="cpu", **kw)


@pytest.fixture(scope="module")
def stories_pair():
    return _ours(STORIES, batch_size=5), _hflm(STORIES, batch_size=5)


def _instances(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _assert_loglik_equal(ours, theirs):
    assert len(ours) == len(theirs)
    for (lo, go), (lh, gh) in zip(ours, theirs):
        assert abs(lo - lh) < TOL, (lo, lh)
        assert go == gh


PREAMBLE = "Once upon a time, there was a little girl named Lily. She liked to play in the park. "
LOGLIK_REQUESTS = [
    ("Once upon a time", " there was a girl"),
    ("Once upon a time", " there was a dog named Bob."),   # shares its context with the one above
    ("Lily liked to play. ", "She was happy."),              # trailing space moves to the continuation
    ("", "The cat sat on the mat."),                          # empty context: the prefix (BOS) token
    ("<s>Hello", " world"),                                    # context starting with the BOS text
    ("Tom and Sue went to the park. They", " saw a big tree"),
] + [(PREAMBLE + q, a) for q in ("Q: What did she see?", "Q: Why?") for a in (" A dog.", " Yes", " No, she did not.")]


def test_loglikelihood_matches_hflm(stories_pair):
    ours, hf = stories_pair
    # a greedy continuation, so that is_greedy is True somewhere
    greedy_text = ours.engine.generate([ours.tok_encode("Once upon a time")], max_new_tokens=6).texts[0]
    reqs = LOGLIK_REQUESTS + [("Once upon a time", greedy_text)]
    a = ours.loglikelihood(_instances("loglikelihood", reqs), disable_tqdm=True)
    b = hf.loglikelihood(_instances("loglikelihood", reqs), disable_tqdm=True)
    _assert_loglik_equal(a, b)
    assert any(g for _, g in b), "no greedy continuation among the requests: is_greedy untested"


def test_shared_preamble_across_batches_matches_hflm(stories_pair):
    """One question per batch: the few-shot preamble's KV is reused from the previous batch."""
    _, hf = stories_pair
    ours = _ours(STORIES, batch_size=3)
    reqs = [(PREAMBLE + f"Q: {q}\nA:", a) for q in ("Who?", "Where did they go?", "What?", "Why not?")
            for a in (" Lily.", " The park", " No")]
    a = ours.loglikelihood(_instances("loglikelihood", reqs), disable_tqdm=True)
    b = hf.loglikelihood(_instances("loglikelihood", reqs), disable_tqdm=True)
    _assert_loglik_equal(a, b)


def test_tokenisation_matches_hflm(stories_pair):
    ours, hf = stories_pair
    for s in ["Once upon a time.", "<s>Hello", "  two  spaces\n\nand lines ", "", "émigré 123"]:
        assert ours.tok_encode(s) == hf.tok_encode(s)
        assert ours._encode_pair("Ctx: " + s + " ", "the end") == hf._encode_pair("Ctx: " + s + " ", "the end")
    assert (ours.prefix_token_id, ours.eot_token_id, ours.max_length) == (hf.prefix_token_id, hf.eot_token_id,
                                                                          hf.max_length)


def test_left_truncation_and_rolling_match_hflm():
    """max_length 24: long requests are cut from the left; rolling windows of 24 tokens."""
    ours, hf = _ours(STORIES, batch_size=3, max_length=24), _hflm(STORIES, batch_size=3, max_length=24)
    a = ours.loglikelihood(_instances("loglikelihood", LOGLIK_REQUESTS), disable_tqdm=True)
    b = hf.loglikelihood(_instances("loglikelihood", LOGLIK_REQUESTS), disable_tqdm=True)
    _assert_loglik_equal(a, b)

    text = (SHARED / "data" / "tinystories" / "validation_head.txt").read_text()[:1200]
    docs = [(text[:500],), (text[500:560],), (text[560:],)]
    ra = ours.loglikelihood_rolling(_instances("loglikelihood_rolling", docs), disable_tqdm=True)
    rb = hf.loglikelihood_rolling(_instances("loglikelihood_rolling", docs), disable_tqdm=True)
    assert len(ours.tok_encode(docs[0][0])) > 3 * 24  # several windows
    for x, y in zip(ra, rb):
        assert abs(x - y) < TOL, (x, y)


GEN_REQUESTS = [
    ("Once upon a time", {"until": ["."], "max_gen_toks": 16}),
    ("Lily saw a", {"until": ["\n"], "max_gen_toks": 16}),
    ("One day, Tom went to the park. He", {"until": ["!", ".", "park"], "max_gen_toks": 16}),
    ("The dog", {"until": ["."], "max_gen_toks": 16}),
    ("Hi", {"until": [], "max_gen_toks": 12}),
]


def test_generate_until_matches_hflm(stories_pair):
    ours, hf = stories_pair
    a = ours.generate_until(_instances("generate_until", GEN_REQUESTS), disable_tqdm=True)
    b = hf.generate_until(_instances("generate_until", GEN_REQUESTS), disable_tqdm=True)
    assert a == b
    assert all(s not in t for t, (_, kw) in zip(a, GEN_REQUESTS) for s in kw["until"])


def test_plan_matches_hflm_with_zeroed_sublayers():
    """attn66 on our runtime == HF with the same attention modules' outputs zeroed."""
    from runtime.plan import load_plan

    ours = _ours(STORIES, plan="attn66", batch_size=4)
    hf = _hflm(STORIES, batch_size=4)
    plan = load_plan("attn66", 5)
    assert plan.drop_attention
    handles = skip_sublayers(hf.model, plan)
    try:
        b = hf.loglikelihood(_instances("loglikelihood", LOGLIK_REQUESTS), disable_tqdm=True)
    finally:
        for h in handles:
            h.remove()
    a = ours.loglikelihood(_instances("loglikelihood", LOGLIK_REQUESTS), disable_tqdm=True)
    _assert_loglik_equal(a, b)


def _write_gen_task(tmp_path):
    """A small generate_until task of our own: story openings, stop at the first full stop."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "openings.jsonl"
    openings = ["Once upon a time", "Tom had a red ball", "The sun was", "Lily and Ben"]
    data.write_text("".join(json.dumps({"prompt": p, "answer": ", there was"}) + "\n" for p in openings))
    (tmp_path / "stories_gen_local.yaml").write_text(
        "task: stories_gen_local\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: generate_until\n"
        "test_split: test\n"
        "doc_to_text: '{{prompt}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['.', '\\n']\n  max_gen_toks: 20\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
        "metadata:\n  version: 1.0\n")
    return tmp_path


def test_local_generation_task_end_to_end(tmp_path):
    """simple_evaluate(model="sublayer", model_args=...) on our local task == HFLM, output for output."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(_write_gen_task(tmp_path)))
    kw = dict(tasks=["stories_gen_local"], task_manager=tm, log_samples=True, batch_size=2)
    ours = lm_eval.simple_evaluate(model="sublayer", model_args=f"pretrained={STORIES},dtype=float32", **kw)
    hf = lm_eval.simple_evaluate(model=_hflm(STORIES, batch_size=2), **kw)
    outs = [s["resps"] for s in ours["samples"]["stories_gen_local"]]
    assert outs == [s["resps"] for s in hf["samples"]["stories_gen_local"]]
    assert len(outs) == 4 and sum(bool(o[0][0]) for o in outs) >= 3
    assert ours["results"]["stories_gen_local"] == hf["results"]["stories_gen_local"]


def test_cli_wrapper(tmp_path):
    from tools.lm_eval import main

    task_dir = _write_gen_task(tmp_path / "tasks")
    rc = main(["--model", "sublayer", "--model_args", f"pretrained={STORIES},batch_size=2",
               "--include_path", str(task_dir), "--tasks", "stories_gen_local", "--limit", "2",
               "--output_path", str(tmp_path / "out")])
    assert rc == 0
    assert list((tmp_path / "out").rglob("results_*.json"))



def test_cli_wrapper_reports_user_errors(monkeypatch, capsys):
    import lm_eval.__main__

    from tools.lm_eval import main

    def fail():
        import sys

        assert sys.argv[1:] == ["--model", "sublayer"]
        raise UserError("/x/missing: no such directory")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", fail)
    assert main(["--model", "sublayer"]) == 2
    assert "error: /x/missing" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    ("pretrained={m},plan=attn200", "attn200"),
    ("pretrained={m},batch_size=0", "batch_size"),
    ("pretrained={m},batch_size=many", "batch_size"),
    ("pretrained={m},max_length=100000", "max_length"),
    ("pretrained={m},dtype=float8", "dtype"),
    ("pretrained={m},temperature=1", "temperature"),
    ("pretrained={m}/nope", "nope"),
])
def test_bad_model_args(args, message):
    from lm_eval.api.registry import get_model

    cls = get_model("sublayer")
    assert cls is adapter.SublayerLM
    with pytest.raises(UserError, match=message):
        cls.create_from_arg_string(args.format(m=STORIES), {"batch_size": 1, "device": "cuda:0"})


def test_cli_device_default_falls_back_to_cpu():
    """lm-eval always passes --device (default cuda:0); model_args win, and a CUDA default on a machine
    without CUDA means the CPU, as HFLM does."""
    lm = adapter.SublayerLM.create_from_arg_string(f"pretrained={STORIES},batch_size=3",
                                                  {"batch_size": 1, "device": "cuda:0", "max_batch_size": None})
    assert lm.batch_size == 3
    if not torch.cuda.is_available():
        assert lm.device.type == "cpu"


def test_smollm2_matches_hflm():
    """A few ARC-style requests on the default model (float32)."""
    from model.default_model import default_model_dir

    path = default_model_dir()
    if not (path / "config.json").is_file():
        pytest.skip("default model not imported")
    reqs = []
    for q, choices in [("Which gas do plants take in from the air?", ["carbon dioxide", "oxygen", "helium"]),
                       ("What is the boiling point of water at sea level?", ["100 degrees Celsius", "50 degrees"])]:
        reqs += [(f"Question: {q}\nAnswer:", " " + c) for c in choices]
    ours, hf = _ours(path, batch_size=8), _hflm(path, batch_size=8)
    a = ours.loglikelihood(_instances("loglikelihood", reqs), disable_tqdm=True)
    b = hf.loglikelihood(_instances("loglikelihood", reqs), disable_tqdm=True)
    _assert_loglik_equal(a, b)
    assert all(math.isfinite(x) for x, _ in a)
