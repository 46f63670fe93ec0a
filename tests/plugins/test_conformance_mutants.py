"""The conformance suite can fail: each broken example backend in ``mutants.py`` fails the tests
meant to catch its bug, with a message that names the broken rule, and the unbroken example
backend passes the same tests.

The mutants run in a child pytest (their failures must not fail this run), which reports per
test in JUnit XML.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import pytest

HERE = Path(__file__).parent

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lmcache_example_plugin") is None,
    reason="the example plugin is not installed: pip install -e tests/plugins/lmcache-example-plugin",
)


def load_expected() -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """``EXPECTED_FAILURES`` and ``EXPECTED_MESSAGES`` of ``mutants.py``."""
    spec = importlib.util.spec_from_file_location("lmcache_conformance_mutants", HERE / "mutants.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EXPECTED_FAILURES, module.EXPECTED_MESSAGES


@pytest.mark.timeout(900)
def test_each_mutant_fails_the_tests_that_target_it(tmp_path: Path) -> None:
    expected, messages = load_expected()
    # "test_x[param]" targets one parametrisation; the child runs every parametrisation of it.
    targets = sorted({name.split("[", 1)[0] for names in expected.values() for name in names})
    node_ids = [f"{HERE / 'mutants.py'}::{cls}::{name}" for cls, names in expected.items() for name in names]
    node_ids = list(dict.fromkeys(node_ids))
    node_ids += [f"{HERE / 'mutants.py'}::TestUnbroken::{name}" for name in targets]
    report = tmp_path / "report.xml"
    # A per-test limit in the child: a hung mutant test is reported as that test failing, with
    # its stack, instead of this whole run being killed with nothing to show.
    cmd = [
        sys.executable, "-m", "pytest", *node_ids, "-q", "-p", "no:cacheprovider",
        "-o", "timeout=120", f"--junitxml={report}",
    ]  # fmt: skip
    # CI=true as on a CI machine: pytest then stops truncating assertion diffs, and Hypothesis
    # loads its derandomized "ci" profile. The suite's failures must stay fast under both.
    env = {**os.environ, "CI": "true"}
    try:
        out = subprocess.run(
            cmd, check=False, cwd=HERE.parent.parent, capture_output=True, text=True, timeout=840, env=env
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-3000:]
        pytest.fail(f"the mutant run did not finish in 840 s; its output ended with:\n{tail!r}")
    child_output = out.stdout[-3000:] + out.stderr[-3000:]
    assert report.exists(), child_output

    outcomes: dict[tuple[str, str], list[str]] = defaultdict(list)
    failure_text: dict[str, str] = defaultdict(str)
    for case in ET.parse(report).getroot().iter("testcase"):
        cls = case.get("classname", "").rsplit(".", 1)[-1]
        full_name = case.get("name", "")
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        if failure is not None:
            outcome = "failed"
            failure_text[cls] += (failure.get("message") or "") + (failure.text or "")
        elif case.find("skipped") is not None:
            outcome = "skipped"
        else:
            outcome = "passed"
        # Under the bare name (any parametrisation) and under the full one.
        outcomes[cls, full_name.split("[", 1)[0]].append(outcome)
        if "[" in full_name:
            outcomes[cls, full_name].append(outcome)

    for name in targets:
        got = outcomes.get(("TestUnbroken", name))
        assert got and set(got) == {"passed"}, f"the unbroken example backend: {name} -> {got}\n{child_output}"
    missed = [
        f"{cls}.{name} -> {outcomes.get((cls, name))}"
        for cls, names in expected.items()
        for name in names
        if "failed" not in outcomes.get((cls, name), [])
    ]
    assert not missed, "the suite did not catch these mutants:\n" + "\n".join(missed) + "\n" + child_output
    unnamed = [f"{cls}: {words!r}" for cls, words in messages.items() if words not in failure_text[cls]]
    assert not unnamed, "these mutants failed without naming the broken rule:\n" + "\n".join(unnamed)
