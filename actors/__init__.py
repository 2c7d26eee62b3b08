"""Environments and actors: vector envs for ALE and procgen, rollout actors, level evaluators."""

from actors.envs import (
    EnvConfig,
    EpisodeRecord,
    VecEnv,
    list_env_families,
    list_games,
    make_vec_env,
    measure_env_sps,
    option_names,
    parse_env_id,
)

__all__ = [
    "EnvConfig",
    "EpisodeRecord",
    "VecEnv",
    "list_env_families",
    "list_games",
    "make_vec_env",
    "measure_env_sps",
    "option_names",
    "parse_env_id",
]
