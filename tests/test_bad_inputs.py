"""The bad-input suite (benchmarks/bad_inputs.py): a generated corpus of broken files, configs and command-line
values, each run through the CLI, must end in one 'error: ...' line with exit code 2 (or a counted skip),
within a time bound, without traceback, temporary files or files from a failed command, and without ever
unpickling code."""


import numpy as np
import pytest
from benchmark_module import load_benchmark

from latentdiff.data.decode import read_image


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    suite = load_benchmark("bad_inputs")
    model, run = suite.train_tiny_model(tmp_path_factory.mktemp("model"))
    root = tmp_path_factory.mktemp("corpus")
    return suite, root, suite.make_corpus(root, model, run, in_subprocess=("sample evil.ckpt", "config latin1.yaml"))


def test_every_bad_input_ends_in_a_clear_error_or_a_counted_skip(corpus):
    suite, root, cases = corpus
    outcomes = [suite.run_case(c, root) for c in cases]
    failed = [f"{o.name}: {'; '.join(o.problems)}" for o in outcomes if not o.passed]
    assert not failed, "\n".join(failed)
    assert len(cases) > 120 and {c.expect for c in cases} == {"error", "skip", "ok"}
    assert sum(c.subprocess for c in cases) == 2
    assert not (root / "marker").exists()  # no loader ran the pickled code


def test_unusual_but_valid_images_are_read_correctly(corpus):
    _, root, _ = corpus
    grey = read_image(root / "images" / "grey16.png", 32, 1)[0].numpy()  # 16-bit gradient 0..65535
    np.testing.assert_allclose(grey[5], np.linspace(0, 255, 32), atol=1)
    red = read_image(root / "images" / "cmyk.jpg", 32, 3).float().mean(dim=(1, 2))  # C=0 M=1 Y=1 K=0: red
    assert red[0] > 200 and red[1] < 60 and red[2] < 60, red
