"""The `loupe` command. Every subcommand turns a LoupeError into one line and exit status 2."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any

from loupe.errors import LoupeError


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_options(items: list[str] | None, flag: str) -> dict[str, Any]:
    """``["k=v", ...]`` -> dict with ints, floats and booleans parsed."""
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LoupeError(f"{flag} expects KEY=VALUE, got {item!r}")
        options[key.replace("-", "_")] = _parse_value(value)
    return options


def default_preset(env_id: str, policy: str) -> str:
    if env_id.startswith("procgen:"):
        return "procgen"
    return "atari-sun" if policy.startswith("sun-") else "atari-nikulin"


# -- train -------------------------------------------------------------------------------------
def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", help="environment id: ALE/<Game>-v5 or procgen:<game>")
    p.add_argument("--policy", default=None, help="policy name (see `loupe policies`)")
    p.add_argument("--preset", default=None, help="PPO preset: procgen, atari-nikulin, atari-sun")
    p.add_argument("--attn-coef", type=float, default=None, help="attention entropy coefficient")
    p.add_argument("--total-steps", type=int, default=None, help="environment steps in all")
    p.add_argument("--run-dir", default=None, help="directory for checkpoints, logs and config")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--num-envs", type=int, default=None, help="environments in all (all actors)")
    p.add_argument("--num-steps", type=int, default=None, help="steps per env per update")
    p.add_argument("--minibatches", type=int, default=None, help="minibatches per epoch")
    p.add_argument("--epochs", type=int, default=None, help="epochs per update")
    p.add_argument("--lr", type=float, default=None, help="learning rate")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--env-option", action="append", metavar="K=V", help="environment option")
    p.add_argument("--policy-option", action="append", metavar="K=V", help="policy option")
    p.add_argument("--checkpoint-every", type=int, default=None, help="updates per checkpoint")
    p.add_argument("--actors", type=int, default=None, help="Ray rollout actors (0: in-process)")
    p.add_argument("--envs-per-actor", type=int, default=None, help="environments per actor")
    p.add_argument("--inference", choices=["actor", "central"], default=None)
    p.add_argument("--max-policy-lag", type=int, default=None)
    p.add_argument("--proximal", choices=["auto", "behaviour", "learner"], default=None,
                   help="PPO ratio against the behaviour policy, the learner (decoupled PPO), or auto: "
                   "the learner when the batch is stale (default)")  # fmt: skip
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="arithmetic of the PPO update: fp32 (default) or bf16 autocast")  # fmt: skip
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: local Ray)")
    p.add_argument("--redis", default=None, help="redis://... URL (default: private server)")
    p.add_argument("--no-announce", action="store_true", help="do not announce checkpoints")
    p.add_argument("--device", default=None, help="auto, cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_train_config(args: argparse.Namespace):
    from actors import EnvConfig
    from learner import PPOConfig
    from loupe.train import TrainConfig

    if not args.env:
        raise LoupeError("--env is required (e.g. procgen:coinrun or ALE/Breakout-v5)")
    if not args.run_dir:
        raise LoupeError("--run-dir is required (a new or empty directory)")
    if args.total_steps is None:
        raise LoupeError("--total-steps is required")
    if args.total_steps <= 0:
        raise LoupeError(f"--total-steps must be positive, got {args.total_steps}")
    for flag in ("num_envs", "num_steps", "minibatches", "epochs", "actors", "envs_per_actor"):
        value = getattr(args, flag)
        if value is not None and value <= 0 and not (flag == "actors" and value == 0):
            raise LoupeError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    policy = args.policy or ("impala" if args.env.startswith("procgen:") else "nature")
    preset = args.preset or default_preset(args.env, policy)
    overrides: dict[str, Any] = {"total_steps": args.total_steps}
    actors = args.actors or 0
    num_envs = args.num_envs
    if args.envs_per_actor is not None:
        if not actors:
            raise LoupeError("--envs-per-actor needs --actors N")
        num_envs = args.envs_per_actor * actors
    for flag, key in (
        ("num_steps", "num_steps"),
        ("minibatches", "num_minibatches"),
        ("epochs", "update_epochs"),
        ("lr", "lr"),
        ("seed", "seed"),
        ("attn_coef", "attn_coef"),
        ("proximal", "proximal"),
        ("precision", "precision"),
    ):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    if num_envs is not None:
        overrides["num_envs"] = num_envs
    ppo = PPOConfig.preset(preset, **overrides)
    env_options = parse_options(args.env_option, "--env-option")
    valid = {f.name for f in dataclasses.fields(EnvConfig) if f.init} - {
        "env_id",
        "num_envs",
        "seed",
    }
    unknown = sorted(set(env_options) - valid)
    if unknown:
        raise LoupeError(
            f"unknown --env-option {', '.join(unknown)}; valid options: {', '.join(sorted(valid))}"
        )
    env = EnvConfig(env_id=args.env, num_envs=ppo.num_envs, seed=ppo.seed, **env_options)
    extra: dict[str, Any] = {}
    for key in (
        "checkpoint_every",
        "inference",
        "max_policy_lag",
        "ray_address",
        "redis",
        "device",
    ):
        if getattr(args, key) is not None:
            extra[key] = getattr(args, key)
    return TrainConfig(
        env=env,
        ppo=ppo,
        run_dir=str(args.run_dir),
        policy=policy,
        policy_options=parse_options(args.policy_option, "--policy-option"),
        preset=preset,
        actors=actors,
        announce=not args.no_announce,
        **extra,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from loupe.rundir import RunDir
    from loupe.train import TrainConfig, Trainer

    if args.resume:
        run = RunDir(args.resume)
        run.require_run()
        config = TrainConfig.load(run.config_path)
        config.run_dir = str(run.path)  # the directory may have been moved or copied
        if args.total_steps is not None:
            if args.total_steps <= 0:
                raise LoupeError(f"--total-steps must be positive, got {args.total_steps}")
            config.ppo.total_steps = args.total_steps
        trainer = Trainer(config, resume=True, progress=not args.no_progress)
    else:
        config = build_train_config(args)
        run = RunDir(config.run_dir)
        run.check_new()
        trainer = Trainer(config, progress=not args.no_progress)  # validates env and policy
        run.create()
        config.save(run.config_path)
    print(
        f"run {config.run_id}: {config.env.env_id}, policy {config.policy}, "
        f"preset {config.preset}, {config.ppo.total_steps} steps -> {run.path}"
    )
    stats = trainer.train()
    print(f"done at step {trainer.learner.global_step}; checkpoints in {run.checkpoints}")
    if "mean_return_100" in stats:
        print(f"mean return over the last 100 episodes: {stats['mean_return_100']:.3f}")
    return 0


# -- demo --------------------------------------------------------------------------------------
def train_namespace(**values) -> argparse.Namespace:
    """The arguments of `loupe train` with defaults, overridden by ``values`` (for the demo)."""
    ns = argparse.Namespace(
        **{a.dest: a.default for a in _train_parser()._actions if a.dest != "help"}
    )
    for key, value in values.items():
        setattr(ns, key, value)
    return ns


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    add_train_args(p)
    return p


def _demo(args: argparse.Namespace) -> int:
    from loupe.cli.demo import cmd_demo

    return cmd_demo(args)


# -- misc ----------------------------------------------------------------------------------------
def cmd_policies(args: argparse.Namespace) -> int:
    from attention import list_policies

    for name in list_policies():
        print(name)
    return 0


def cmd_envs(args: argparse.Namespace) -> int:
    from actors import list_env_families, list_games

    for family in list_env_families():
        games = list_games(family)
        print(f"{family}: {', '.join(games)}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loupe", description="Train attention-augmented PPO agents and look inside them."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("train", help="PPO training; writes and announces checkpoints")
    add_train_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("demo", help="a small end-to-end run on the embedded default")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--total-steps", type=int, default=32768)
    p.add_argument("--levels", type=int, default=100, help="evaluation levels per agent")
    p.add_argument("--workers", type=int, default=2, help="Ray evaluators")
    p.set_defaults(func=_demo)
    p = sub.add_parser("policies", help="list the policy networks")
    p.set_defaults(func=cmd_policies)
    p = sub.add_parser("envs", help="list environment families and games")
    p.set_defaults(func=cmd_envs)
    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


#: other modules append functions ``register(subparsers)`` here (probe, evaluate, bench, ...)
_EXTRA_COMMANDS: list = []


def _load_extra_commands() -> None:
    import importlib

    for module in ("loupe.cli.bench", "loupe.cli.probe", "loupe.cli.evaluate", "loupe.cli.compare",
                   "loupe.cli.view"):  # fmt: skip
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        _EXTRA_COMMANDS.append(mod.register)


def main(argv: list[str] | None = None) -> int:
    _load_extra_commands()
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except LoupeError as exc:
        print(f"loupe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loupe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
