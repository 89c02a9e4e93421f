"""``validator`` — the validator's command line: ``validator run`` and ``validator replay``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from peer.errors import ConfigError, run_cli
from peer.net.dial_policy import private_allowed_for


class _Parser(argparse.ArgumentParser):
    """argparse that reports a wrong flag as one line and exit code 2, no usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _default_data_dir(config_name: str) -> Path:
    return Path.home() / ".cache" / "gradswarm" / "data" / config_name


def build_parser() -> argparse.ArgumentParser:
    from peer.chain import add_chain_args
    from peer.chain.wallet import add_wallet_args
    from peer.net.publisher import add_publisher_args
    from peer.tracking import add_tracking_args

    parser = _Parser(
        prog="validator",
        description="Score peers' contributions each round (a budgeted sample) and set weights on chain.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    p = sub.add_parser(
        "run",
        help="evaluate every round and set weights",
        description=(
            "Follow the chain's rounds: fetch θ_r and every peer's Δ_r from their publishers, measure what each Δ "
            "does to the held-out loss and whether it was trained on its assigned pages, score, set weights."
        ),
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--config", default="debug", help="model config name or YAML path (must match the peers')")
    g.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="prepared data (default: ~/.cache/gradswarm/data/<config>)",
    )
    g.add_argument(
        "--corpus-dir",
        type=Path,
        default=None,
        help="offline corpus folder (default: $GRADSWARM_CORPUS or .cache/corpus)",
    )
    g.add_argument(
        "--data",
        default=None,
        help="sharded data set: URL or path of its manifest.json, the same as the peers' (default: built-in corpus)",
    )
    g.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g = p.add_argument_group("swarm")
    g.add_argument(
        "--run-id", required=True, help="the swarm's run id (W&B group; records of other runs are refused)"
    )
    g.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="EMA, weight queue, round records, fetched blobs (default: ~/.gradswarm/<run id>/validator-<wallet>-<hotkey>)",
    )
    g.add_argument(
        "--round-blocks",
        type=int,
        default=None,
        help="blocks per round (default: train.round_seconds / block time)",
    )
    g.add_argument("--max-rounds", type=int, default=None, help="stop after evaluating N rounds")
    g.add_argument("--max-seconds", type=float, default=None, help="stop after N seconds")
    g.add_argument(
        "--publish-grace",
        type=float,
        default=1.0,
        help="seconds to wait after a round ends before fetching it",
    )
    g = p.add_argument_group("budget (how many peers a round evaluates; see validator.sampling)")
    g.add_argument(
        "--eval.max-peers",
        dest="max_peers",
        type=int,
        default=32,
        help="peers with a contribution evaluated per round, the longest not evaluated first plus a few "
        "drawn at random by the hash of the block that ends the round (0 = all; default 32)",
    )
    g.add_argument(
        "--eval.max-seconds",
        dest="max_eval_seconds",
        type=float,
        default=0.0,
        help="seconds of evaluation per round: no new peer is started once the next one would not fit; "
        "the rest are 'not sampled (time budget)' and go first next round (0 = no limit)",
    )
    g.add_argument(
        "--eval.min-listings",
        dest="min_listings",
        type=int,
        default=16,
        help="peers listed at least per round for the vote on the round's state (the sample plus extras "
        "drawn by the end-of-round hash; everyone is listed when they disagree; default 16)",
    )
    g.add_argument(
        "--eval.fetch-parallel",
        dest="fetch_parallel",
        type=int,
        default=16,
        help="publishers fetched from at the same time (default 16)",
    )
    g.add_argument(
        "--eval.fetch-deadline",
        dest="fetch_deadline",
        type=float,
        default=None,
        help="seconds the fetch step of a round may take; what has not arrived is refused "
        "(default: half a round, at least 30 s)",
    )
    g.add_argument(
        "--eval.page-key-delay",
        dest="page_key_delay",
        type=float,
        default=5.0,
        help="seconds after a round's end, at least (rounded up to whole blocks, at least one), before the "
        "block whose hash draws the evaluated pages (always a block produced after every Δ was fetched; "
        "validators that finish fetching within it draw the same pages and agree; default 5)",
    )
    g = p.add_argument_group("scoring")
    g.add_argument(
        "--delta-scale",
        type=float,
        default=None,
        help="α in θ_r − α·Δ (default 0.5; see validator.evaluation)",
    )
    g.add_argument(
        "--ema-alpha", type=float, default=None, help="weight of the newest round in the EMA (default 0.3)"
    )
    g.add_argument(
        "--burn.uid",
        dest="burn_uid",
        type=int,
        default=None,
        help="uid that receives unearned weight (none by default)",
    )
    g.add_argument(
        "--burn.fraction",
        dest="burn_fraction",
        type=float,
        default=0.0,
        help="share always given to --burn.uid",
    )
    add_publisher_args(
        p,
        serves="this validator's signed per-round explanations to miners",
        dialled_by="miners",
        no_publish_help="do not serve explanations (miners cannot see their reasons)",
    )
    add_chain_args(p)
    add_wallet_args(p)
    add_tracking_args(p)
    p.set_defaults(func=cmd_run)

    r = sub.add_parser("replay", help="recompute a recorded round and show why each peer got its score")
    r.add_argument("--round", type=int, required=True, help="round to replay")
    r.add_argument("--state-dir", type=Path, required=True, help="the validator's state dir")
    r.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="prepared data (default: ~/.cache/gradswarm/data/<config>)",
    )
    r.add_argument("--corpus-dir", type=Path, default=None, help="offline corpus folder")
    r.add_argument(
        "--config",
        default=None,
        help="model config the round was scored with (default: the record's config name, looked up in "
        "model_configs/); pass the YAML file when the validator ran one from elsewhere",
    )
    r.add_argument("--data", default=None, help="sharded data set (manifest URL or path) the round used")
    r.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    r.add_argument("--json", action="store_true", help="print the replayed scores as JSON instead of a table")
    r.set_defaults(func=cmd_replay)
    return parser


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    for noisy in ("transformers", "urllib3", "libp2p", "multiaddr", "trio", "async_service"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_run(args) -> int:
    _setup_logging()
    import torch

    from peer.chain import ChainClock, NotRegistered, chain_config_from_args, connect
    from peer.chain.membership import ensure_registered
    from peer.chain.wallet import load_coldkey, load_hotkey, wallet_config_from_args
    from peer.config import load_run_config
    from peer.data.shards import open_page_store
    from peer.net.fetch import FetchClient, FetchConfig
    from peer.net.layout import ArtifactLayouts
    from peer.tracking import make_tracker, tracking_config_from_args
    from validator.evaluation import EvalConfig
    from validator.loop import BudgetedEvaluator, LoopConfig, Validator, run
    from validator.sampling import SamplingConfig, page_key_delay_blocks
    from validator.scoring import BurnPolicy, ScoringConfig
    from validator.store import ValidatorStore
    from validator.weights import WeightsConfig, WeightSetter

    run_cfg = load_run_config(args.config)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    if args.threads:
        torch.set_num_threads(args.threads)
    eval_cfg = EvalConfig(device=device, **({"delta_scale": args.delta_scale} if args.delta_scale else {}))
    scoring_cfg = ScoringConfig(
        burn=BurnPolicy(uid=args.burn_uid, fraction=args.burn_fraction),
        max_delta_norm=run_cfg.train.max_delta_norm,
        **({"ema_alpha": args.ema_alpha} if args.ema_alpha else {}),
    )
    weights_cfg = WeightsConfig()
    chain_cfg = chain_config_from_args(args)
    wallet = wallet_config_from_args(args)
    keypair = load_hotkey(wallet)
    state_dir = (
        args.state_dir
        or Path.home() / ".gradswarm" / args.run_id / f"validator-{wallet.name}-{wallet.hotkey}"
    )
    data_dir = args.data_dir or _default_data_dir(run_cfg.name)
    pages = open_page_store(args.data, data_dir, run_cfg.data, args.corpus_dir)
    store = ValidatorStore(state_dir)

    chain = connect(chain_cfg)
    client = None
    tracker = None
    publisher = None
    try:
        if chain.uid_of(chain_cfg.netuid, keypair.ss58_address) is None:
            if not chain_cfg.is_local:
                raise NotRegistered(
                    f"hotkey {keypair.ss58_address} is not registered on subnet {chain_cfg.netuid}: register it "
                    f"(btcli subnets register) and stake to it for a validator permit"
                )
            ensure_registered(chain, chain_cfg.netuid, keypair, load_coldkey(wallet), burn=False)
        round_blocks = args.round_blocks or max(1, round(run_cfg.train.round_seconds / chain.block_time))
        loop_cfg = LoopConfig(
            run_id=args.run_id,
            netuid=chain_cfg.netuid,
            round_blocks=round_blocks,
            publish_grace_s=args.publish_grace,
            max_rounds=args.max_rounds,
            max_seconds=args.max_seconds,
            sampling=SamplingConfig(
                max_peers=args.max_peers,
                max_seconds=args.max_eval_seconds,
                min_listings=args.min_listings,
            ),
            fetch_parallel=args.fetch_parallel,
            fetch_deadline_s=args.fetch_deadline or max(30.0, 0.5 * round_blocks * chain.block_time),
            dial_private=private_allowed_for(chain_cfg),
            page_key_delay_blocks=page_key_delay_blocks(args.page_key_delay, chain.block_time),
        )
        signal.signal(signal.SIGTERM, _terminate)
        publisher = (
            None
            if args.no_publish
            else _start_explanation_publisher(args, chain, chain_cfg, keypair, state_dir, round_blocks)
        )
        client = FetchClient(
            FetchConfig(
                cache_dir=store.blobs,
                run_id=args.run_id,
                layouts=ArtifactLayouts.for_run(run_cfg),
                allow_private=private_allowed_for(chain_cfg),
            )
        )
        client.start()
        tracker = make_tracker(
            tracking_config_from_args(args),
            run_id=args.run_id,
            job_type="validator",
            name=f"validator-{keypair.ss58_address[:8]}",
            config={
                "config": run_cfg.name,
                "eval": vars(eval_cfg),
                "netuid": chain_cfg.netuid,
                "round_blocks": round_blocks,
            },
            default_dir=state_dir,
        )
        v = Validator(
            cfg=loop_cfg,
            run=run_cfg,
            hotkey=keypair,
            chain=chain,
            clock=ChainClock(chain=chain, round_blocks=round_blocks),
            client=client,
            evaluator=BudgetedEvaluator(eval_cfg, run_cfg, pages, sketch_key=store.sketch_key()),
            store=store,
            pages=pages,
            setter=WeightSetter(chain, chain_cfg.netuid, keypair, state_dir, weights_cfg),
            tracker=tracker,
            eval_cfg=eval_cfg,
            scoring_cfg=scoring_cfg,
            weights_cfg=weights_cfg,
            on_round=None if publisher is None else _explanation_writer(publisher, keypair),
        )
        print(
            f"validator {keypair.ss58_address} on subnet {chain_cfg.netuid}: rounds of {round_blocks} blocks, "
            f"state in {state_dir}",
            file=sys.stderr,
            flush=True,
        )
        run(v)
    finally:
        if tracker is not None:
            tracker.finish()
        if client is not None:
            client.close()
        if publisher is not None:
            publisher.stop()
        chain.close()
    return 0


def _start_explanation_publisher(args, chain, chain_cfg, keypair, state_dir: Path, round_blocks: int):
    """The validator's publisher: serves its signed explanation records (peer.net.explanations), with its
    address committed on chain like a peer's, so any miner can fetch why it earned what it earned."""
    import logging

    from peer.chain.membership import commit_address, ensure_commitment
    from peer.net.identity import identity_path, load_or_create_identity
    from peer.net.publisher import start_publisher

    id_file = identity_path(state_dir)
    load_or_create_identity(id_file)
    publisher = start_publisher(state_dir / "outbox", id_file, args.publisher_listen)
    addr = commit_address(publisher.addrs, args.publisher_announce, local=chain_cfg.is_local)
    try:
        ensure_commitment(chain, chain_cfg.netuid, keypair, publisher.commitment(addr))
    except ConfigError as e:  # rate limited: keep validating; miners see explanations once it lands
        logging.getLogger("gradswarm.validator").warning("explanations not announced yet: %s", e)
    publisher.publish_identity(keypair, run_id=args.run_id, round_=chain.block() // round_blocks)
    return publisher


def _explanation_writer(publisher, keypair):
    """on_round hook: sign the round's explanation and put it where the publisher serves it."""
    from peer.net.explanations import build_explanation, write_explanation

    def write(rec) -> None:
        record = build_explanation(rec.to_json(), hotkey=keypair.ss58_address, peer_id=publisher.peer_id)
        write_explanation(publisher.outbox, record.signed(keypair))

    return write


def cmd_replay(args) -> int:
    import json

    from validator.replay import replay_round
    from validator.store import ValidatorStore
    from validator.tracking import explanation_table

    if not args.state_dir.is_dir():
        raise ConfigError(f"--state-dir {args.state_dir} does not exist")
    store = ValidatorStore(args.state_dir)
    rec = store.load_round(args.round)
    data_dir = args.data_dir or _default_data_dir(rec.config_name)
    result = replay_round(
        store,
        args.round,
        data_dir,
        device=args.device,
        corpus_dir=args.corpus_dir,
        data=args.data,
        config=args.config,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "round": args.round,
                    "scores": result.replayed.scores,
                    "weights": result.replayed.weights,
                    "mismatches": result.mismatches,
                },
                indent=2,
            )
        )
    else:
        print(explanation_table(result.replayed))
        if result.ok:
            print(
                f"replay of round {args.round} matches what the validator logged "
                f"({len(result.replayed.scores)} peers)"
            )
        else:
            print(f"replay of round {args.round} DIFFERS from what the validator logged:")
            for m in result.mismatches:
                print(f"  {m}")
    return 0 if result.ok else 1


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_cli(lambda: args.func(args), f"validator {args.command}")


if __name__ == "__main__":
    sys.exit(main())
