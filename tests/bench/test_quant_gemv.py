"""``python -m bench.quant_gemv``: bad flags exit 2 naming the flag (the timings are a script's output,
not a test)."""

import pytest

from bench import quant_gemv


@pytest.mark.parametrize("argv,flag", [(["--repeats", "0"], "--repeats"), (["--quants", "int4"], "--quants"),
                                       (["--quants", "fp8"], "--quants"), (["--context", "x"], "--context")])
def test_bad_flags_exit_2(argv, flag, capsys):
    assert quant_gemv.main(argv) == 2
    assert flag in capsys.readouterr().err
