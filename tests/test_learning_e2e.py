"""The end-to-end learning check: the whole pipeline must produce a policy that clearly beats a random one.

`experiments/reach_e2e.py` on Reach (16x16 pixels, the goal's position visible only in the image): record 3000
steps of a noisy demonstrator, train tokenizer, dynamics + BC + reward and then imagination (800 offline gradient
steps), and evaluate 40 greedy episodes. Two seeds run side by side, one process and one thread each.

The margin: the final policy's mean return must exceed the uniform random policy's by at least 2.0 per 12-step
episode on every seed (random scores about 1.1, the demonstrator about 7, straight to the goal about 9.9). A
policy that cannot see the goal does no better than random, so a broken tokenizer, world model, BC or imagination
step fails this test. Measured with `python experiments/reach_e2e.py --seeds 0 1 2`: final 5.45 / 6.35 / 5.10
against random 0.97 / 0.95 / 1.40 (BC alone 3.70 / 5.40 / 5.70), see docs/results.md.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1)
MARGIN = 2.0


def test_pipeline_policy_beats_random_on_reach_on_every_seed(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {
        seed: subprocess.Popen(
            [sys.executable, "experiments/reach_e2e.py", "--seeds", str(seed), "--run-dir", str(tmp_path / str(seed))],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for seed in SEEDS
    }
    rows = []
    for seed, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-3000:]
        rows.append(json.loads((tmp_path / str(seed) / "result.json").read_text())["seeds"][0])
    report = "\n".join(f"seed {r['seed']}: random {r['random']:.2f}, demonstrator {r['demonstrator']:.2f}, "
                       f"BC {r['bc']:.2f}, final {r['final']:.2f} ({r['wall_seconds']:.0f} s)" for r in rows)
    print(report)
    for row in rows:
        assert row["episodes"] >= 20 and row["grad_steps"] == 800
        assert row["final"] >= row["random"] + MARGIN, report
