"""`loupe demo`: the whole loop, small, on the embedded default.

1. train a PPO agent with self-attention (``sun-swa``: Sun et al. row self-attention, whose maps
   and entropy the probes show) on CoinRun, checkpoints announced on a private Redis;
2. a probe worker follows the run's checkpoint stream and analyses each checkpoint (figures plus
   summary.json, and one overview.png per checkpoint);
3. the last checkpoint is edited to blind it to its first NMF feature at the analysis layer;
4. original and edited agents play the same unseen levels on Ray evaluators, failures by cause.

At the end it names the figure to open first: the last checkpoint's overview.png.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from loupe.config import load_json

#: the demo's policy: small, and with attention maps (see ``loupe policies``)
DEMO_POLICY = "sun-swa"


def run_demo(run_dir: Path, total_steps: int, levels: int, workers: int) -> int:
    from loupe.cli import build_train_config, train_namespace
    from loupe.rundir import RunDir
    from loupe.train import Trainer

    ns = train_namespace(
        env="procgen:coinrun", policy=DEMO_POLICY, run_dir=str(run_dir),
        total_steps=total_steps, num_envs=16, num_steps=64, minibatches=4, epochs=2,
        checkpoint_every=max(1, total_steps // (16 * 64) // 2),
        env_option=["num_levels=200", "distribution_mode=easy"],
    )  # fmt: skip
    config = build_train_config(ns)
    run = RunDir(config.run_dir)
    run.check_new()
    trainer = Trainer(config)
    run.create()
    config.save(run.config_path)
    print(
        f"[1/4] training {config.policy} on {config.env.env_id} for {total_steps} steps -> {run.path}"
    )
    trainer.train()

    print("[2/4] probing every announced checkpoint (IG, attention maps, NMF, GAE scan, saliency)")
    from loupe.bus import CheckpointBus
    from loupe.bus.probe_worker import ProbeWorker, WorkerConfig, connect_run
    from probes.suite import ProbeConfig

    client, server = connect_run(run.path, None)
    try:
        bus = CheckpointBus(client, config.run_id)
        worker = ProbeWorker(bus, run.path, WorkerConfig(exit_when_idle=1.0),
                             ProbeConfig(num_steps=64, ig_samples=32, smoothgrad_copies=8))  # fmt: skip
        worker.run()
        results = [f["scalars"] | {"step": f["step"]}
                   for _, f in bus.read_results(decode=True) if f["kind"] == "probe"]  # fmt: skip
    finally:
        if server is not None:
            server.stop()
    for r in sorted(results, key=lambda r: r["step"]):
        entropy = r.get("attention_entropy")
        print(
            f"      step {r['step']:>7}: top-10 attribution share {r['top10_attribution_share']:.3f}, "
            f"completeness delta {r['max_completeness_delta']:.2e}, anomalies {r['anomaly_count']:.0f}"
            + ("" if entropy is None else f", attention entropy {entropy:.3f}")
        )
    from learner.checkpoint import latest_checkpoint, read_meta
    from probes.editing import write_edited_checkpoint

    last = latest_checkpoint(run.path)
    meta = read_meta(last)
    summary_path = worker.out_dir(meta["step"], meta["sha256"]) / "summary.json"
    summary = load_json(summary_path)
    layer = summary["layer"]
    print(f"[3/4] editing the last checkpoint: project NMF feature 0 out of layer {layer}")
    direction = summary["nmf"]["directions"][0]
    edited = write_edited_checkpoint(last, layer, direction, f"nmf:0 of {summary_path}",
                                     run.path / "edited")  # fmt: skip

    print(
        f"[4/4] evaluating original and edited agents on {levels} unseen levels with {workers} Ray evaluators"
    )
    from loupe.distributed.evaluate import EvalConfig, evaluate, format_table

    result = evaluate(EvalConfig(checkpoints=[str(last), str(edited)], out=str(run.path / "eval"),
                                 levels=levels, start_level=10_000, workers=workers))  # fmt: skip
    print(format_table(result))
    print(f"\nrun directory: {run.path}")
    print(f"  checkpoints  {run.checkpoints}")
    print(
        f"  probes       {run.path / 'probes'} (summary.json, overview.png + figures per checkpoint)"
    )
    print(f"  evaluation   {run.path / 'eval'} (results.json, failure_causes.png)")
    print(f"  TensorBoard  tensorboard --logdir {run.tb}")
    print(f"\nopen first: {summary_path.parent / 'overview.png'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from loupe.cli.args import check_out

    run_dir = check_out(args.run_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}", "--run-dir")
    return run_demo(run_dir, args.total_steps, args.levels, args.workers)
