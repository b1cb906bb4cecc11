"""bench/hf_peer.py without torch: its arguments, its report, and its bltjax side on a fixture.

The bltjax side is checked against what the transformers port generated on the
k2_noproj fixture (greedy, `use_cache=False`, ids 0/1/3 suppressed, stop at EOS), stored
below. Regenerate with torch + transformers (see tests/fixtures/hf_blt/README.md):

  echo '["def add(a, b):\\n    return", "The quick brown fox jumps"]' > /tmp/p.json
  /work/hfvenv/bin/python bench/hf_peer.py port --hf tests/fixtures/hf_blt/k2_noproj \
      --out /tmp/k2.json --prompt_file /tmp/p.json --prompts 2 --batch_sizes 2 --max_bytes 40
"""

import importlib.util
import json
import os
import sys

import pytest

from conftest import REPO

SPEC = importlib.util.spec_from_file_location("hf_peer", os.path.join(REPO, "bench",
                                                                      "hf_peer.py"))
hf_peer = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(hf_peer)

FIXTURE = os.path.join(REPO, "tests", "fixtures", "hf_blt", "k2_noproj")
PROMPTS = ["def add(a, b):\n    return", "The quick brown fox jumps"]
MAX_BYTES = 40
# The port's generated ids (byte + 4; EOS 2 kept) for PROMPTS at batch 2.
PORT_TOKENS = [
    [186, 49, 130, 5, 98, 8, 159, 25, 22, 121, 214, 17, 160, 216, 150, 131, 155, 165,
     98, 165, 159, 121, 123, 171, 8, 62, 221, 209, 189, 222, 165, 218, 130, 216, 57,
     130, 50, 251, 233, 57],
    [106, 21, 121, 128, 206, 104, 82, 121, 183, 8, 98, 129, 183, 222, 15, 147, 120, 56,
     142, 233, 131, 254, 89, 163, 49, 225, 121, 18, 26, 147, 23, 91, 225, 67, 8, 193,
     15, 121, 199, 147],
]


def test_module_imports_without_torch_or_jax():
  # Importing the script (what `all` and the tests do) must not need torch or jax.
  source = open(os.path.join(REPO, "bench", "hf_peer.py")).read()
  top = source.split("\ndef ", 1)[0]
  for name in ("torch", "jax", "transformers", "bltjax", "numpy"):
    assert f"\nimport {name}" not in top and f"\nfrom {name}" not in top


def test_parser_defaults_and_steps():
  p = hf_peer.parser()
  args = p.parse_args(["all"])
  assert args.batch_sizes == [1, 8] and args.max_bytes == 256 and args.prompt_bytes == 64
  assert args.prompts == 8 and args.batch1_prompts == 2 and args.repeats == 1
  # the torch venv when this machine has one, else the running Python
  assert args.hf_python == (hf_peer.DEFAULT_HF_PYTHON
                            if os.path.exists(hf_peer.DEFAULT_HF_PYTHON) else sys.executable)
  args = p.parse_args(["port", "--hf", "h", "--out", "o.json", "--batch_sizes", "1,4",
                       "--threads", "1"])
  assert args.batch_sizes == [1, 4] and args.threads == 1 and args.attn == "eager"
  args = p.parse_args(["bltjax", "--hf", "h", "--port", "p.json", "--converted", "c",
                       "--methods", "ar", "--no_append"])
  assert args.methods == ["ar"] and args.no_append and not args.reconvert
  args = p.parse_args(["build", "--hf", "h"])
  assert args.patch_len == 4.5


@pytest.mark.parametrize("argv", [
    ["port", "--hf", "h", "--out", "o", "--batch_sizes", "1,x"],
    ["port", "--hf", "h", "--out", "o", "--batch_sizes", "0"],
    ["bltjax", "--hf", "h", "--port", "p", "--converted", "c", "--methods", "blt_d"],
    ["port", "--hf", "h"],                                      # --out missing
    ["nope"],
])
def test_parser_refuses(argv):
  with pytest.raises(SystemExit):
    hf_peer.parser().parse_args(argv)


@pytest.mark.parametrize("argv", [
    ["all", "--batch_sizes", "1,16"],                           # more than --prompts 8
    ["all", "--repeats", "0"],
    ["port", "--hf", "h", "--out", "o", "--max_bytes", "0"],
])
def test_check_args_refuses(argv):
  with pytest.raises(SystemExit):
    hf_peer.main(argv)


def test_stdlib_prompts_are_ascii_windows():
  prompts = hf_peer.stdlib_prompts(8, 64)
  assert len(prompts) == 8 and len({p for _, p in prompts}) == 8
  for source, p in prompts:
    assert len(p) == 64 and p.isascii() and "@" in source


def test_compare():
  assert hf_peer.first_difference([5, 6, 7], [5, 6, 7]) is None
  assert hf_peer.first_difference([5, 6, 7], [5, 9, 7]) == 1
  assert hf_peer.first_difference([5, 6, 2], [5, 6]) == 2      # one stopped early
  c = hf_peer.compare([[5, 6], [7, 8]], [[5, 6], [7, 9]])
  assert not c["equal"] and c["rows_equal"] == 1 and c["first_difference"] == [None, 1]


def _port_json(path, tokens_by_run):
  runs = []
  for tokens in tokens_by_run:
    n = sum(len(t) for t in tokens)
    runs.append(dict(batch=2, rows=[0, 1], seconds=1.0, bytes=n, bytes_per_s=float(n),
                     tokens=tokens, margins=[[1.0] * len(t) for t in tokens],
                     min_margin=1.0))
  ref = dict(hf=FIXTURE, prompts=[list(p.encode()) for p in PROMPTS],
             prompt_sources=["test[0]", "test[1]"], prompt_bytes=len(PROMPTS[0].encode()),
             max_bytes=MAX_BYTES, attn_implementation="eager", torch="-",
             transformers="-", torch_threads=1, cpu="-", cores=2, date="-",
             load_before=[], load_after=[], runs=runs, parameters=178872)
  with open(path, "w") as f:
    json.dump(ref, f)


def test_bltjax_side_reproduces_the_port_on_a_fixture(tmp_path):
  """AR and BLT-S on the converted fixture generate the port's bytes; a run whose
  reference was tampered with is reported as different, with a diagnosis."""
  assert len({len(p.encode()) for p in PROMPTS}) == 1
  tampered = [list(t) for t in PORT_TOKENS]
  tampered[1][7] = 4 + ord("#") if tampered[1][7] != 4 + ord("#") else 4 + ord("%")
  port_json = tmp_path / "port.json"
  _port_json(port_json, [PORT_TOKENS, tampered])
  results = tmp_path / "RESULTS.md"
  out = tmp_path / "out.json"
  assert hf_peer.main(["bltjax", "--hf", FIXTURE, "--port", str(port_json), "--converted",
                       str(tmp_path / "conv"), "--methods", "ar", "blt_s", "--results",
                       str(results), "--json", str(out), "--command", "test"]) == 0
  report = json.loads(out.read_text())
  rows = [r for r in report["rows"] if r["equal"] is not None]
  assert [(r["label"], r["equal"]) for r in rows] == [
      ("AR", True), ("BLT-S k=8", True), ("BLT-S k=16", True),
      ("AR", False), ("BLT-S k=8", False), ("BLT-S k=16", False)]
  for r in rows[:3]:
    assert r["tokens"] == PORT_TOKENS and r["bytes_per_s"] > 0 and r["speedup"] > 0
  for r in rows[3:]:
    assert r["check"]["first_difference"] == [None, 7]
    (d,) = r["diagnosis"]
    assert d["row"] == 1 and d["position"] == 7 and d["bltjax"] == PORT_TOKENS[1][7]
    assert d["bltjax_margin"] > 0 and sum(d["patches"]) == 1 + len(PROMPTS[1]) + 7
  text = results.read_text()
  assert "## Peer comparison" in text and "Command: `test`" in text
  assert text.count("| AR | 2 |") == 2 and "**no** (1/2 rows; first difference at byte 7)" in text
