"""The reference_check script's contract: one row per case, a summary line, the exit code."""

import json
import shutil
import subprocess
import sys

from tests.conftest import FIXTURE_DIR


def test_rows_summary_and_exit_code(tmp_path):
    fixture = tmp_path / "fixture"
    shutil.copytree(FIXTURE_DIR, fixture)
    cases = json.loads((fixture / "cases.json").read_text())
    by_name = {c.get("name"): c for c in cases["cases"]}
    unknown_option = dict(by_name["ar_fixed_4"], name="ar_unknown_option",
                          options={**by_name["ar_fixed_4"]["options"], "no_such_option": 1})
    cases["cases"] = [cases["cases"][0], by_name["ar_fixed_4"], unknown_option]
    (fixture / "cases.json").write_text(json.dumps(cases))
    run = subprocess.run([sys.executable, "-m", "experiments.reference_check", f"--fixture_dir={fixture}"],
                         capture_output=True, text=True, timeout=600)
    rows = [line for line in run.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert [r.split()[:2] for r in rows] == [["PASS", "forward_fwd0"], ["PASS", "ar_fixed_4"],
                                             ["FAIL", "ar_unknown_option"]]
    assert "unsupported" in rows[2] and "no_such_option" in rows[2]
    assert run.stdout.splitlines()[-1] == "reference_check: 2/3 cases pass"
    assert run.returncode == 1
