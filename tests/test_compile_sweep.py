"""`mashvlm compile --sweep`: sweep values and errors, the table's rows (fits, out of memory,
failed variants, the fastest that fits), the depth extrapolation of a scanned model's cost,
and (with libtpu) a remat sweep of the tiny config for a v5p-8 slice."""
import json

import pytest

from conftest import load_config, require
from mashvlm_jax.model.config import ModelConfig
from mashvlm_jax.train import compile_check, flops

GIB = 2 ** 30


def tiny_config():
  config = load_config("tiny_synthetic")
  config.data.batch_size = 8
  config.lock()
  return config


# ------------------------------------------------------------------ values and errors


def test_sweep_values_take_the_field_type():
  assert compile_check.parse_sweep("model.remat_policy=none, dots,full") == (
      "model.remat_policy", ["none", "dots", "full"])
  config = tiny_config()
  variants = compile_check.sweep_variants(config, [
      ("model.remat_policy", ["none", "full"]), ("data.batch_size", ["8", "16"])])
  settings = [(v.model.remat_policy, v.data.batch_size) for _, v in variants]
  assert settings == [("none", 8), ("none", 16), ("full", 8), ("full", 16)]  # a grid
  assert config.data.batch_size == 8  # the input config is not changed
  text_len = compile_check.with_value(config, "text_len", "40")
  assert text_len.data.text_len == 40  # the data.text_len -> text_len reference is kept
  assert compile_check.with_value(config, "model.scan_layers", "true").model.scan_layers is True
  assert compile_check.with_value(config, "optim.lr", "1e-4").optim.lr == 1e-4


@pytest.mark.parametrize("sweep, message", [
    ("model.remat_policy", "is not KEY=V1,V2"),
    ("model.remat_policy=", "is not KEY=V1,V2"),
    ("model.remat_polcy=none,full", "model has no 'remat_polcy'"),
    ("optimizer.lr=1e-4", "the config has no 'optimizer'"),
    ("model.remat_policy=none,everything", "variant model.remat_policy=everything: "
                                           "model.remat_policy must be one of"),
    ("data.batch_size=8,2.5", "data.batch_size=2.5: '2.5' is not an int"),
    ("model.scan_layers=yes", "model.scan_layers=yes: 'yes' is not true or false"),
    ("model.llm=1", "'model.llm' is a section"),
])
def test_bad_sweep_fails_before_compiling(monkeypatch, sweep, message):
  def no_compile(*args, **kwargs):
    raise AssertionError("nothing may compile when the sweep is bad")
  monkeypatch.setattr(compile_check, "check", no_compile)
  errors = []
  status = compile_check.run_sweep(tiny_config(), "v5p-8", [sweep], echo=print,
                                   echo_error=errors.append)
  assert status == 2 and message in errors[-1], errors


# ------------------------------------------------------------------ rows and the fastest


def fake_report(config, fits=True, flops_per_chip=1e12, bytes_per_chip=1e9):
  """A v5p-8 report with hand-set memory and XLA cost (out of memory: fits None)."""
  tpu = compile_check.parse_topology("v5p-8")
  report = compile_check.Report(
      tpu=tpu, mesh=dict(data=1, fsdp=4, tensor=1), batch_size=config.data.batch_size,
      text_len=32, seq_len=119, attention_backend="splash", params=1000,
      flops_per_step=2e12, peak_flops_per_chip=459e12)
  if fits is None:
    report.error = "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm"
    return report
  total = tpu.hbm_bytes + (0 if fits else 1)
  report.memory = compile_check.Memory(arguments=GIB, outputs=GIB, aliased=GIB,
                                       temporaries=total - GIB, generated_code=0,
                                       hbm=tpu.hbm_bytes)
  report.cost = compile_check.Cost(flops=flops_per_chip, bytes_accessed=bytes_per_chip)
  return report


def test_rows_for_too_big_refused_and_failed_variants(monkeypatch, tmp_path):
  # batch 8: fits, memory-bound; 16: fits, compute-bound and slower; 32: faster but does
  # not fit; 64: XLA refuses it (out of memory); 12: fails to build (a ValueError).
  def check(config, topology, **kwargs):
    batch = config.data.batch_size
    if batch == 12:
      raise ValueError("global batch 12 does not split over data x fsdp = 8")
    return {8: lambda: fake_report(config, flops_per_chip=1e12, bytes_per_chip=8e9),
            16: lambda: fake_report(config, flops_per_chip=2e12, bytes_per_chip=1e9),
            32: lambda: fake_report(config, fits=False, flops_per_chip=1e9),
            64: lambda: fake_report(config, fits=None)}[batch]()
  monkeypatch.setattr(compile_check, "check", check)
  lines, errors = [], []
  out = tmp_path / "sweep.json"
  status = compile_check.run_sweep(tiny_config(), "v5p-8", ["data.batch_size=8,16,32,64,12"],
                                   json_path=str(out), echo=lines.append,
                                   echo_error=errors.append)
  assert status == 2  # a variant failed to build
  assert errors == ["mashvlm compile --sweep: variant data.batch_size=12: ValueError: global "
                    "batch 12 does not split over data x fsdp = 8"]
  table = lines[0].splitlines()
  rows = {line.split(" | ")[0][2:]: line for line in table[2:7]}
  assert rows["data.batch_size=8"].endswith("**fastest that fits** |")
  assert "| yes |" in rows["data.batch_size=16"] and "fastest" not in rows["data.batch_size=16"]
  assert "| NO |" in rows["data.batch_size=32"] and "fastest" not in rows["data.batch_size=32"]
  assert "| NO | - | - | - (XLA: out of memory)" in rows["data.batch_size=64"]
  assert "| error | ValueError: global batch 12" in rows["data.batch_size=12"]
  # 8: max(1e12 / 459e12, 8e9 / 2765e9) = 2.893 ms (HBM); 16: 2e12 / 459e12 = 4.357 ms.
  saved = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
  assert saved["data.batch_size=8"]["roofline_seconds"] == pytest.approx(8e9 / 2765e9)
  assert saved["data.batch_size=16"]["roofline_seconds"] == pytest.approx(2e12 / 459e12)
  assert saved["data.batch_size=8"]["roofline_mfu"] == pytest.approx(
      2e12 / (4 * 459e12 * 8e9 / 2765e9))
  assert [r["variant"] for r in saved.values() if r["fastest"]] == ["data.batch_size=8"]
  assert saved["data.batch_size=64"]["fits"] is False
  assert saved["data.batch_size=12"]["error"].startswith("ValueError")
  without_failure = compile_check.run_sweep(tiny_config(), "v5p-8", ["data.batch_size=8,32"],
                                            echo=lines.append, echo_error=errors.append)
  assert without_failure == 0
  assert compile_check.run_sweep(tiny_config(), "v5p-8", ["data.batch_size=32,64"],
                                 echo=lines.append, echo_error=errors.append) == 1
  assert "fastest" not in lines[-1]


def test_scanned_layers_cost_extrapolated_from_unrolled_probes(monkeypatch):
  # XLA counts a while body once; the probes are unrolled and their cost is linear in
  # depth here by construction: 7 + 3 per decoder layer + 5 per vision layer (x1e9).
  seen = []

  def check(config, topology, **kwargs):
    model = config.model
    seen.append((model.scan_layers, model.llm.num_layers, model.vision.num_layers,
                 model.vision.feature_layer, kwargs.get("for_cost", False)))
    report = fake_report(config)
    report.cost = compile_check.Cost(
        flops=1e9 * (7 + 3 * model.llm.num_layers + 5 * model.vision.num_layers),
        bytes_accessed=1e6 * (2 + model.llm.num_layers + 4 * model.vision.num_layers))
    return report
  monkeypatch.setattr(compile_check, "check", check)
  config = load_config("tiny_synthetic")
  config.model.scan_layers = True
  config.model.vision.feature_layer = -1  # runs both vision layers
  config.lock()
  rows = compile_check.run_variants(
      compile_check.sweep_variants(config, [("model.remat_policy", ["full"])]), "v5p-8",
      attention_backend="splash", mesh=None, echo_error=print)
  # the probes are compiled for their cost (without windowed-einsum loops), the step not
  assert seen == [(True, 4, 2, -1, False), (False, 1, 1, 1, True), (False, 2, 1, 1, True),
                  (False, 1, 2, 2, True)]
  assert rows[0].report.cost == compile_check.Cost(flops=1e9 * (7 + 3 * 4 + 5 * 2),
                                                   bytes_accessed=1e6 * (2 + 4 + 4 * 2))
  assert rows[0].cost_source.startswith("unrolled")


def test_roofline_counts_at_least_the_analytic_flops():
  # XLA's count lacks what Mosaic kernels (splash) compute: 0.4 TFLOP per chip here
  # against 2e12 / 4 chips = 0.5 analytic, so the compute time is 0.5e12 / 459e12 and the
  # MFU the roofline implies stays at most 100%.
  report = fake_report(tiny_config(), flops_per_chip=0.4e12, bytes_per_chip=1e9)
  assert report.compute_flops == 0.5e12
  assert report.roofline_seconds == pytest.approx(0.5e12 / 459e12)
  assert report.roofline_mfu == pytest.approx(1.0)
  above = fake_report(tiny_config(), flops_per_chip=0.6e12, bytes_per_chip=1e9)
  assert above.roofline_seconds == pytest.approx(0.6e12 / 459e12)


class FakeCompiled:
  """A compiled step as step_cost reads it: its text (with ``loops`` while loops) and
  XLA's cost analysis."""

  def __init__(self, loops, flops):
    self.loops, self.flops = loops, flops

  def as_text(self):
    return "ENTRY %main {\n" + "  %w = (s32[]) while(%t), body=%b\n" * self.loops + "}"

  def cost_analysis(self):
    return {"flops": self.flops, "bytes accessed": 1.0}


class FakeLowered:
  def __init__(self, compiled):
    self.compiled, self.options = compiled, []

  def compile(self, compiler_options=None):
    self.options.append(compiler_options)
    return self.compiled


def test_step_cost_recompiles_without_loops_and_refuses_to_undercount():
  options = compile_check.COST_COMPILER_OPTIONS
  # no loop: the compile's own cost, nothing compiled again
  lowered = FakeLowered(FakeCompiled(0, 5.0))
  assert compile_check.step_cost(FakeCompiled(0, 3.0), lambda: lowered, None, options) == (
      compile_check.Cost(3.0, 1.0), "")
  assert lowered.options == []
  # windowed-einsum or microbatch loops: compiled again, with the options that keep the
  # windowed einsums out, from the program the step lowers to without the scan
  assert compile_check.step_cost(FakeCompiled(32, 1.0), lambda: lowered, None,
                                 options)[0].flops == 5.0
  assert lowered.options == [options]
  # loops that stay: no number rather than a wrong one
  cost, note = compile_check.step_cost(FakeCompiled(33, 1.0),
                                       lambda: FakeLowered(FakeCompiled(1, 2.0)))
  assert cost is None and "keeps 1 while loops" in note
  cost, note = compile_check.step_cost(FakeCompiled(2, 1.0), None)
  assert cost is None and "keeps 2 while loops" in note


# ------------------------------------------------------------------ AOT compile with libtpu


def test_cost_counts_the_matmuls_of_windowed_einsum_loops():
  """On 32 chips with fsdp=32 XLA turns the sharded matmuls of a 512-wide decoder into
  windowed-einsum loops whose bodies its cost analysis counts once (a third of the
  analytic FLOPs before the fix). The cost now comes from a compile without them: within
  10% of the analytic step per chip. About 40 s on 2 cores. Needs libtpu."""
  require("libtpu")
  config = load_config("tiny_synthetic")
  config.model.llm.update(vocab_size=8192, hidden_size=512, intermediate_size=1024,
                          num_layers=2, num_heads=8, num_kv_heads=8)
  config.model.dtype = "bfloat16"
  config.data.batch_size = 64
  report = compile_check.check(config, "v5p-64", mesh={"data": 1, "fsdp": -1, "tensor": 1})
  assert report.fits and report.mesh["fsdp"] == 32
  analytic = 64 * flops.train_flops_per_row(ModelConfig.from_dict(config.model), 32) / 32
  assert 0.9 * analytic < report.cost.flops < 1.1 * analytic, (report.cost, analytic)
  assert "cost compile" in report.seconds  # the step itself had the loops


def test_cost_of_accumulated_microbatches_counts_every_one():
  """With grad_accum_steps=2 the step scans two microbatches, whose body XLA's cost
  analysis counts once (it printed no cost before). The cost is now read from the step
  with the scan unrolled, and the depth probes of a scanned stack unroll it too: the
  FLOPs of the whole batch, as the analytic count gives them (XLA read 0.91x of it for
  this step without accumulation). About 60 s on 2 cores. Needs libtpu."""
  require("libtpu")
  config = load_config("tiny_synthetic")
  config.data.batch_size = 16
  config.grad_accum_steps = 2
  accumulated = compile_check.check(config, "v5p-8")
  assert accumulated.cost is not None, accumulated.cost_note
  assert "cost compile" in accumulated.seconds  # the step as it runs kept its scan
  analytic = accumulated.flops_per_step / accumulated.tpu.chips
  assert 0.8 * analytic < accumulated.cost.flops < 1.3 * analytic, (accumulated.cost,
                                                                    analytic)
  config.model.scan_layers = True
  probed = compile_check.depth_probe_cost(config, "v5p-8", attention_backend="splash",
                                          mesh=None)
  assert probed.flops == pytest.approx(accumulated.cost.flops, rel=0.05)


def test_remat_sweep_tiny_for_v5p_8(tmp_path):
  """Two AOT compiles of the tiny step for v5p-8 with fsdp over the 4 chips (about 25 s on
  2 cores). Needs libtpu: a failure under CI, a skip elsewhere."""
  require("libtpu")
  lines, errors = [], []
  out = tmp_path / "sweep.json"
  status = compile_check.run_sweep(tiny_config(), "v5p:2x2x1",
                                   ["model.remat_policy=none,full"], mesh_text="fsdp=-1",
                                   json_path=str(out), echo=lines.append,
                                   echo_error=errors.append)
  assert status == 0 and not errors, errors
  rows = json.loads(out.read_text())["rows"]
  assert [r["variant"] for r in rows] == ["model.remat_policy=none", "model.remat_policy=full"]
  none, full = (r["xla_cost_per_chip"] for r in rows)
  assert full["flops"] > 1.05 * none["flops"]  # full remat recomputes each layer's forward
  cfg = ModelConfig.from_dict(load_config("tiny_synthetic").model)
  analytic = 8 * flops.train_flops_per_row(cfg, 32)
  # Per chip, not per slice: a quarter of the analytic step, XLA counting non-matmul
  # arithmetic on top and the splash kernel's attention not at all.
  assert 0.8 * analytic / 4 < none["flops"] < 1.2 * analytic / 4
  # the compute time counts at least the analytic FLOPs (XLA does not see inside splash)
  seconds = [max(max(r["xla_cost_per_chip"]["flops"], analytic / 4) / 459e12,
                 r["xla_cost_per_chip"]["bytes_accessed"] / 2765e9) for r in rows]
  for row, expected in zip(rows, seconds):
    assert row["fits"] and row["roofline_seconds"] == pytest.approx(expected)
    assert row["roofline_mfu"] == pytest.approx(analytic / (4 * 459e12 * expected))
    assert row["cost_source"] == "compiled step"  # the tiny config is unrolled
  fastest = min(range(2), key=seconds.__getitem__)
  assert [r["fastest"] for r in rows] == [i == fastest for i in range(2)]
  marked = [line for line in lines[0].splitlines() if "fastest that fits" in line]
  assert len(marked) == 1 and marked[0].startswith(f"| {rows[fastest]['variant']} |")
