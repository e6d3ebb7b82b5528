"""Hostile HumanEval completions through the task's own scoring (default sandbox limits), then the
canonical solution: each hostile one must score as a failure, a folder outside the sandbox must be
unchanged, this process must survive, and the run must go on.

    python benchmarks/evaluate/hostile_completions.py    # writes hostile_completions.json here
"""

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from huginn_jax.tasks import registry, sandbox

DATA = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "eval-data-subset"


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        h.update(str(path.relative_to(folder)).encode() + oct(path.lstat().st_mode).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def main() -> None:
    task = registry.get_task("humaneval")
    doc = task.load_docs(DATA, limit=1)[0]
    watched = Path(tempfile.mkdtemp(prefix="watched-"))
    (watched / "keep.txt").write_text("precious\n")
    body = "    pass\n"  # each attack runs when the completion's function body is defined
    attacks = {
        "infinite loop": "    while True:\n        pass\n",
        "memory bomb": "    b = []\n    while True:\n        b.append(bytearray(100 << 20))\n",
        "fork bomb": "    import os\n    while True:\n        os.fork()\n",
        "write outside its folder": f"    open({str(watched / 'new.txt')!r}, 'w').write('x')\n",
        "delete files": f"    import shutil\n    shutil.rmtree({str(watched)!r})\n",
        "network connection": "    import socket\n    socket.create_connection(('1.1.1.1', 80), timeout=2)\n",
        "kill its parent": "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n",
        "fake a pass (exit 0)": "    import os\n    os._exit(0)\n",
    }
    # the attack runs at import time of the program (top level), before the tests
    completions = [body + "\n" + "\n".join(line[4:] for line in src.splitlines()) + "\n" for src in attacks.values()]
    completions.append(task.oracle_completion(doc))
    before = digest(watched)
    start = time.perf_counter()
    scores = task.score_many([doc] * len(completions), completions)
    seconds = time.perf_counter() - start
    results = {name: {"status": s.get("status"), "correct": s["correct"]} for name, s in zip(attacks, scores)}
    results["canonical solution afterwards"] = {"status": scores[-1].get("status"), "correct": scores[-1]["correct"]}
    report = {"results": results, "watched_folder_unchanged": digest(watched) == before, "seconds": seconds,
              "protections": sandbox.protections(), "parent_alive": os.getpid() > 0}
    (Path(__file__).parent / "hostile_completions.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
