"""The Python API (`bltjax.load`) and `bltjax generate`, on a briefly trained tiny BLT.

One BLT is trained (static patching, 2 steps). A second model directory reuses its
weights with entropy patching by a small random entropy model stored inside it (the
layout of a `bltjax convert` output), so generation runs the whole online-patching
path; that entropy model's directory is itself an entropy-model workdir.
"""

import math
import os
import re
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bltjax
from bltjax import checkpoint
from bltjax import cli
from bltjax import configs
from bltjax import evaluate
from bltjax import objectives
from bltjax.model import entropy_model, patcher
from bltjax import model as model_lib
from conftest import OLD_FUSION_EMITTERS, tiny_blt_config, train_on_one_device

PROMPTS = ["def greet(name):\n    return", "import os", ""]   # ragged, one empty
ENTROPY_SHAPE = configs.transformer_section(32, 1, 2, window=16)


@pytest.fixture(scope="module")
def workdir(tiny_corpus, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("api") / "blt")
  config = tiny_blt_config(tiny_corpus, "static", train__steps=2, train__save_every=2,
                           train__eval_every=0, train__eval_batches=1)
  train_on_one_device(config, path)
  return path


@pytest.fixture(scope="module")
def entropy_dir(workdir, tmp_path_factory):
  """`workdir`'s weights patched by a random entropy model in `<dir>/entropy`."""
  path = tmp_path_factory.mktemp("api") / "blt_entropy"
  shutil.copytree(os.path.join(workdir, "checkpoints"), path / "checkpoints")
  ent = configs.base_config()
  ent.model.entropy = ENTROPY_SHAPE
  module = entropy_model.EntropyModel(model_lib.transformer_config(ent.model.entropy, ent.model))
  tokens = np.asarray([list(b"def greet(name):\n    return f'hi {name}'\n")], np.int32) + 4
  params = nn.meta.unbox(jax.jit(module.init)(jax.random.PRNGKey(0), tokens,
                                              np.ones_like(tokens))["params"])
  entropies = jax.jit(lambda p, t: patcher.entropies_from_logits(
      module.apply({"params": p}, t, jnp.ones_like(t))))(params, tokens)
  threshold = float(np.median(np.asarray(entropies)))   # about every other byte fires
  ent.patcher.threshold = threshold
  ent.patcher.max_patch_len = 6
  checkpoint.save_params(str(path / "entropy"), params)
  (path / "entropy" / "config.json").write_text(configs.to_json(ent))
  config = checkpoint.read_config(workdir)
  with config.unlocked():   # config.model.entropy stays the (larger) default shape
    config.patcher.update(mode="entropy", threshold=threshold, max_patch_len=6,
                          entropy_workdir="entropy")
  (path / "config.json").write_text(configs.to_json(config))
  return str(path)


# Correctness does not need optimised code: compile generation faster (2 CPU cores).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def model(entropy_dir):
  return bltjax.load(entropy_dir, compiler_options=FAST_COMPILE)


def test_load_a_training_workdir(workdir):
  static = bltjax.load(workdir)
  assert static.kind == "blt" and static.step == 2 and static.patcher_config.mode == "static"
  assert static.patch(["abcdefghij"]) == [[1, 4, 4, 2]]   # BOS alone, then patch_size 4
  assert "step=2" in repr(static)


def test_score_equals_eval_bpb(model, entropy_dir, tmp_path):
  text = "def add(a, b):\n    return a + b\n"
  (tmp_path / "add.py").write_text(text)
  expected = evaluate.evaluate_workdir(entropy_dir, str(tmp_path / "add.py"), seq_len=64,
                                       batch_size=8)
  assert expected.bytes == len(text) + 1
  scores = model.score([text, "x" * 70])    # a longer text in the batch changes nothing
  assert scores[0] == pytest.approx(expected.bpb, rel=1e-5)
  assert 0 < scores[1] < 12


def test_logits_do_not_depend_on_padding_and_patches(model):
  texts = ["hi", "hello there, a longer line"]
  logits = model.logits(texts)
  assert logits.shape == (2, 27, 260) and logits.dtype == np.float32
  # Row 0 (3 positions, padded to the length bucket inside) equals the unpadded forward.
  tokens = np.asarray([[1, ord("h") + 4, ord("i") + 4]], np.int32)
  batch = {"inputs": tokens, "segment_ids": np.ones_like(tokens)}
  objective = objectives.BltObjective(model.config)
  forward = jax.jit(lambda params, frozen, batch: objective.module.apply(
      {"params": params}, batch["inputs"], batch["segment_ids"],
      objective.patches(batch, frozen))[0])
  unpadded = forward(model.params, model.frozen, batch)
  np.testing.assert_allclose(logits[0, :3], unpadded[0], rtol=1e-5, atol=1e-5)
  # The same rows as ids (BOS + byte + 4, PAD right-padded) give the same logits.
  ids = np.zeros((2, 27), np.int32)
  for i, t in enumerate(texts):
    ids[i, :len(t) + 1] = [1] + [b + 4 for b in t.encode()]
  np.testing.assert_allclose(model.logits(ids), logits, rtol=1e-6, atol=1e-6)
  # Patch lengths cover BOS + bytes, the BOS patch first.
  lengths = model.patch(texts + ["déjà vu"])
  assert [sum(x) for x in lengths] == [3, 27, len("déjà vu".encode()) + 1]
  assert all(x[0] == 1 and max(x) <= 6 for x in lengths)
  assert len(lengths[1]) > 5              # entropy patching cut the long line


def test_every_method_on_a_ragged_batch(model):
  ar = model.generate(PROMPTS, max_bytes=20, method="ar")
  assert ar.compile_seconds > 0 and len(ar.texts) == 3
  assert all(len(t) == 20 or t[-1] == 2 for t in ar.tokens)
  assert ar.nfe["entropy"] > 0 and ar.nfe["global"] < ar.nfe["decoder"]
  assert ar.nfe_per_byte["decoder"] == pytest.approx(ar.nfe["decoder"] * 3 / ar.num_bytes)
  assert ar.traffic.per_byte()["total"] > 0 and ar.bytes_per_s > 0
  # Traffic counts the entropy model actually loaded, not config.model.entropy's shape.
  n_entropy = sum(x.size for x in jax.tree.leaves(model.frozen))
  assert model.sizes.params["entropy"] == n_entropy < 50_000
  assert ar.traffic.weights["entropy"] == 2 * ar.nfe["entropy"] * n_entropy
  assert ar.seconds >= ar.decode_seconds + ar.compile_seconds * 0.99
  outputs = {"ar": ar}
  for method, options in (("blt_s", dict(draft_len=4)), ("blt_dv", dict(draft_len=4)),
                          ("blt_d", dict(block_size=4, alpha=0.3)),
                          ("blt_h", dict(block_size=4, gate=0.0))):
    out = model.generate(PROMPTS, max_bytes=20, method=method, **options)
    assert len(out.texts) == 3 and all(1 <= len(t) <= 20 for t in out.tokens), method
    assert out.method == method and out.stats
    outputs[method] = out
  # Greedy self-speculation is exact.
  assert outputs["blt_s"].texts == ar.texts and outputs["blt_dv"].texts == ar.texts
  assert outputs["blt_s"].stats["drafted"] > 0
  assert outputs["blt_h"].stats["diffusion_blocks"] > 0   # gate 0: every boundary diffuses
  # A gate no block's confidence reaches: BLT-H is AR (gate is a knob: the same program).
  never = model.generate(PROMPTS, max_bytes=20, method="blt_h", block_size=4, gate=1.5)
  assert never.texts == ar.texts and never.stats["diffusion_blocks"] == 0
  assert never.compile_seconds == 0.0
  # A second call with the same batch size, length bucket and options compiles nothing.
  compiles = []
  listener = lambda event, *args, **kwargs: compiles.append(event) if "compile" in event else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  before = model.compiles
  try:
    again = model.generate(["class A:", "x = 1", "y"], max_bytes=20, method="ar")
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert again.compile_seconds == 0.0 and model.compiles == before
  assert not [e for e in compiles if "backend_compile" in e]
  assert len(again.texts) == 3
  # The prefill is timed apart only when asked (one more compile, then cached).
  assert math.isnan(again.prefill_seconds) and math.isnan(again.generation_bytes_per_s)
  timed = model.generate(["class A:", "x = 1", "y"], max_bytes=20, method="ar",
                         time_prefill=True)
  assert model.compiles == before + 1 and timed.tokens == again.tokens
  assert timed.prefill_seconds > 0   # timings themselves are benchmarks, not asserted
  assert timed.generation_seconds == timed.decode_seconds - timed.prefill_seconds
  model.generate(["class A:", "x = 1", "y"], max_bytes=20, method="ar", time_prefill=True)
  assert model.compiles == before + 1


def test_same_seed_same_sampled_text_for_ar_and_blt_s(model):
  sampled = dict(max_bytes=16, temperature=1.0, top_p=0.95, seed=7)
  ar = model.generate(PROMPTS[:2], method="ar", **sampled)
  spec = model.generate(PROMPTS[:2], method="blt_s", draft_len=4, **sampled)
  assert spec.texts == ar.texts


def test_entropy_workdir_loads_for_scoring_and_patching(entropy_dir):
  ent = bltjax.load(os.path.join(entropy_dir, "entropy"))
  assert ent.kind == "entropy"
  assert 0 < ent.score(["some text"])[0] < 12
  assert ent.logits(["ab"]).shape == (1, 3, 260)
  assert sum(ent.patch(["some text"])[0]) == len("some text") + 1
  with pytest.raises(ValueError, match="entropy model, which has no generation"):
    ent.generate(["x"])


def test_clear_errors(model, workdir, tmp_path):
  # A plain BLT (no diffusion loss) has no trained block size: blt_d takes DecodeConfig's.
  assert model.trained_block_size is None and model.decode_config("blt_d").block_size == 8
  with pytest.raises(ValueError, match="prompts is empty"):
    model.generate([])
  with pytest.raises(ValueError, match="wrap it in a list"):
    model.generate("a prompt")
  with pytest.raises(ValueError, match="method 'beam' is not one of ar, blt_d, blt_s"):
    model.generate(["x"], method="beam")
  with pytest.raises(ValueError, match="unknown option 'blocksize'.*valid options: .*block_size"):
    model.generate(["x"], method="blt_d", blocksize=4)
  with pytest.raises(ValueError, match="alpha=0.5 and gamma=1.0 both given: each picks BLT-D's "
                     "unmasking rule"):
    model.generate(["x"], method="blt_d", alpha=0.5, gamma=1.0)
  with pytest.raises(ValueError, match=r"needs 9257 positions > max_len=8192.*max_len=9257"
                     r".*--max_len 9257"):
    model.generate(["x" * 9000], max_bytes=256)
  with pytest.raises(ValueError, match="block_commit"):
    model.generate(["x"], method="blt_d", block_commit="sometimes")
  with pytest.raises(ValueError, match="ids must lie in"):
    model.logits(np.full((1, 4), 999))
  with pytest.raises(ValueError, match=r"seed=4294967296 must be an integer in \[0, 4294967296\)"):
    model.generate(["x"], seed=2**32, temperature=1.0)
  with pytest.raises(ValueError, match=r"seed=1\.5 must be an integer"):
    model.generate(["x"], seed=1.5, temperature=1.0)
  with pytest.raises(ValueError, match="block_size=1000000 is more than the max_len=8192"):
    model.generate(["x"], method="blt_d", block_size=10**6)
  with pytest.raises(ValueError, match="continuations must be a list of strings"):
    model.score_continuations(["ab"], "cd")
  with pytest.raises(ValueError, match=r"max_bytes=2\.7 must be an integer >= 1"):
    model.generate(["x"], max_bytes=2.7)
  with pytest.raises(ValueError, match=r"prompts\[1\] holds '\\udcff', which is not UTF-8"):
    model.generate(["x", "\udcff"])
  empty = tmp_path / "untrained"
  empty.mkdir()
  shutil.copy(os.path.join(workdir, "config.json"), empty / "config.json")
  with pytest.raises(FileNotFoundError, match="has no checkpoints yet; train it first"):
    bltjax.load(str(empty))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    bltjax.load(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="'.*config.json' is a file, not a directory"):
    bltjax.load(str(empty / "config.json"))


def test_a_missing_or_incomplete_checkpoint_step_names_the_steps_that_load(workdir, tmp_path):
  clone = tmp_path / "copy"
  shutil.copytree(workdir, clone, ignore=shutil.ignore_patterns("eval", "tb"))
  with pytest.raises(FileNotFoundError, match=r"has no checkpoint of step 999; complete steps: 2;"
                     r" load one of them \(step=N, or --step N\)"):
    bltjax.load(str(clone), step=999)
  (clone / "checkpoints" / "5").mkdir()   # an interrupted save or copy: the latest step
  for step in (None, 5):
    with pytest.raises(FileNotFoundError, match=r"checkpoints/5 is incomplete .*remove that "
                       r"folder, or load a complete step \(2\) with step=N or --step N"):
      bltjax.load(str(clone), step=step)
  assert bltjax.load(str(clone), step=2).step == 2


def test_generate_command_run_again_reads_its_compiled_program_from_the_disk_cache(
    workdir, tmp_path):
  # The command compiles with XLA:CPU's own fusion emitters, as a user's would: with the
  # suite's faster-compiling ones its first compile is short enough that the fixed costs
  # of a cached run (tracing, loading) can exceed half of it.
  xla_flags = os.environ.get("XLA_FLAGS", "").replace(OLD_FUSION_EMITTERS, "")
  env = dict(os.environ, BLTJAX_COMPILE_CACHE=str(tmp_path / "xla_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", XLA_FLAGS=xla_flags)
  command = [sys.executable, "-m", "bltjax.cli", "generate", "--workdir", workdir,
             "--prompt", "def ", "--max_bytes", "8", "--repeats", "0"]

  def compile_seconds():
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return float(re.search(r"compile ([0-9.]+) s", proc.stdout).group(1))

  first = compile_seconds()
  assert os.listdir(tmp_path / "xla_cache")
  assert compile_seconds() < first / 2


def test_generate_command(model, entropy_dir, tmp_path, capsys, monkeypatch):
  # The command gets the test's model, whose compiled decoders (3 prompts, max_bytes 20:
  # ar, blt_s with k = 4) the tests above already built.
  monkeypatch.setattr(bltjax, "load", lambda path, **kwargs: model)
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("import os\ndef greet(name):\nclass A:\n")
  assert cli.main(["generate", "--workdir", entropy_dir, "--prompts", str(prompts),
                   "--method", "ar", "--method", "blt_s", "--draft_len", "4",
                   "--max_bytes", "20", "--repeats", "0"]) == 0
  out = capsys.readouterr().out
  assert "--- ar [1] 'def greet(name):' +" in out and "=== cost per method" in out
  lines = [line for line in out.splitlines() if line.startswith(("ar ", "blt_s "))]
  assert len(lines) == 2 and all("NFE/byte entropy" in line and "bytes/s" in line
                                 for line in lines)
  assert "ar" in lines[1] and ("below ar" in lines[1] or "above ar" in lines[1])
  # --scanned_layers reaches generate; this model has no scanned stack, so it decodes with
  # the programs compiled above
  options = []
  generate = model.generate
  monkeypatch.setattr(model, "generate", lambda *a, **k: options.append(k) or generate(*a, **k))
  before = model.compiles
  assert cli.main(["generate", "--workdir", entropy_dir, "--prompts", str(prompts),
                   "--method", "blt_s", "--draft_len", "4", "--max_bytes", "20", "--repeats",
                   "0", "--scanned_layers"]) == 0
  assert options[-1]["unroll_layers"] is False and model.compiles == before
  # Prompts are bytes, as given: a command line's non-UTF-8 (surrogate-escaped by Python)
  # and a file's lines, whatever their encoding.
  capsys.readouterr()
  prompts.write_bytes(b"\xfe\xff y\r\n\ndef greet(name):\n")
  calls = []
  monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(a) or generate(*a, **k))
  assert cli.main(["generate", "--workdir", entropy_dir, "--prompt", "\udcffx", "--prompts",
                   str(prompts), "--method", "blt_s", "--draft_len", "4", "--max_bytes", "20",
                   "--repeats", "0"]) == 0
  assert calls[-1][0] == [b"\xffx", b"\xfe\xff y", b"def greet(name):"]
  out = capsys.readouterr().out
  assert "--- blt_s [0] b'\\xffx' +" in out and "--- blt_s [2] 'def greet(name):' +" in out
  assert model.compiles == before
  assert cli.main(["generate", "--workdir", entropy_dir, "--prompts", str(tmp_path)]) == 2
  assert f"--prompts {tmp_path} is a directory; pass a text file" in capsys.readouterr().err
  # --prompts repeats; a byte-order mark is not a prompt's; a file of blank lines is named.
  other = tmp_path / "other.txt"
  other.write_bytes(b"\xef\xbb\xbfclass A:\n")
  assert cli.main(["generate", "--workdir", entropy_dir, "--prompts", str(prompts),
                   "--prompts", str(other), "--method", "blt_s", "--draft_len", "4",
                   "--max_bytes", "20", "--repeats", "0"]) == 0
  assert calls[-1][0] == [b"\xfe\xff y", b"def greet(name):", b"class A:"]
  other.write_text("\n  \n")
  assert cli.main(["generate", "--workdir", entropy_dir, "--prompts", str(other)]) == 2
  assert f"--prompts {other} holds no prompt (every line is blank)" in capsys.readouterr().err
  # --step and --max_len reach bltjax.load; a row longer than max_len names the flag.
  loads = []
  monkeypatch.setattr(model, "max_len", 16)
  monkeypatch.setattr(bltjax, "load", lambda path, **kwargs: loads.append(kwargs) or model)
  assert cli.main(["generate", "--workdir", entropy_dir, "--prompt", "x", "--max_bytes", "20",
                   "--step", "2", "--max_len", "16"]) == 2
  assert loads == [dict(step=2, max_len=16)]
  out, err = capsys.readouterr()
  assert "needs 22 positions > max_len=16;" in err and "--max_len 22 on the command line" in err
  assert out == ""   # refused before anything is printed
  assert cli.main(["generate", "--workdir", entropy_dir]) == 2
  assert "no prompts; pass --prompt TEXT" in capsys.readouterr().err
  assert cli.main(["generate", "--workdir", entropy_dir, "--prompt", "x", "--method", "blt_s",
                   "--draft_len", "1"]) == 2
  assert "draft_len >= 2" in capsys.readouterr().err
