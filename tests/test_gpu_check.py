"""bench/gpu_check.py --cpu-rehearsal: the GPU check's code paths, minus CUDA."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_rehearses_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-rehearsal",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["failed"] == []
    assert [r["embeddings"] for r in res["qlora"]] == ["tied", "untied"]
    for r in res["qlora"]:
        assert r["checks"]["index_tokens_trainable"] and r["checks"]["resume_matches"]
        assert r["checks"]["reload_matches"] and r["resume_max_diff"] < 1e-5
    assert 130 < res["shape_params_m"]["smollm2-135m"] < 140          # the shapes are the real ones
    assert 6500 < res["shape_params_m"]["llama-2-7b"] < 7000
    assert res["speed"][0]["score"] and res["speed"][0]["train_step"]["s_per_step"] > 0


def test_gpu_check_refuses_without_cuda_unless_rehearsing():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--cpu-rehearsal" in proc.stdout
