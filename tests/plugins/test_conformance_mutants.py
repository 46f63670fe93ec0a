"""The conformance suite can fail: each broken example backend in ``mutants.py`` fails the tests
meant to catch its bug, and the unbroken example backend passes the same tests.

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


def load_expected() -> dict[str, tuple[str, ...]]:
    spec = importlib.util.spec_from_file_location("lmcache_conformance_mutants", HERE / "mutants.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EXPECTED_FAILURES


@pytest.mark.timeout(900)
def test_each_mutant_fails_the_tests_that_target_it(tmp_path: Path) -> None:
    expected = load_expected()
    targets = sorted({name for names in expected.values() for name in names})
    node_ids = [f"{HERE / 'mutants.py'}::{cls}::{name}" for cls, names in expected.items() for name in names]
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
    for case in ET.parse(report).getroot().iter("testcase"):
        cls = case.get("classname", "").rsplit(".", 1)[-1]
        name = case.get("name", "").split("[", 1)[0]
        if case.find("failure") is not None or case.find("error") is not None:
            outcomes[cls, name].append("failed")
        elif case.find("skipped") is not None:
            outcomes[cls, name].append("skipped")
        else:
            outcomes[cls, name].append("passed")

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
