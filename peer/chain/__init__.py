"""Chain access for peers and validators: one ``Chain`` protocol, two implementations.

    from peer.chain import ChainConfig, connect
    chain = connect(ChainConfig(network="local", ledger_path=".cache/ledger/ledger.sqlite"))
    chain.register(netuid, hotkey_kp)            # LocalLedger: free unless the subnet has a burn
    chain.set_commitment(netuid, hotkey_kp, b"/ip4/127.0.0.1/tcp/4001/p2p/…")
    mg = chain.metagraph(netuid)

See :mod:`peer.chain.base` for the protocol, results and errors.
"""

from peer.chain.base import (
    BadSignature,
    BurnRequired,
    Chain,
    ChainError,
    ChainUnreachable,
    CommitRevealError,
    ExtrinsicFailed,
    Hyperparameters,
    InsufficientBalance,
    Metagraph,
    Neuron,
    NotRegistered,
    PermissionDenied,
    RateLimited,
    Registration,
    RegistrationError,
    RevealTooEarly,
    RevealTooLate,
    SubnetNotFound,
    SubnetParams,
    TxResult,
    UnknownNetwork,
    WeightCommit,
    WeightsError,
    ensure_commitment,
)
from peer.chain.clock import ChainClock
from peer.chain.commit_reveal import commit_hash, make_salt
from peer.chain.config import ChainConfig, add_chain_args, chain_config_from_args, connect

__all__ = [
    "BadSignature",
    "BurnRequired",
    "Chain",
    "ChainClock",
    "ChainConfig",
    "ChainError",
    "ChainUnreachable",
    "CommitRevealError",
    "ExtrinsicFailed",
    "Hyperparameters",
    "InsufficientBalance",
    "Metagraph",
    "Neuron",
    "NotRegistered",
    "PermissionDenied",
    "RateLimited",
    "Registration",
    "RegistrationError",
    "RevealTooEarly",
    "RevealTooLate",
    "SubnetNotFound",
    "SubnetParams",
    "TxResult",
    "UnknownNetwork",
    "WeightCommit",
    "WeightsError",
    "add_chain_args",
    "chain_config_from_args",
    "commit_hash",
    "connect",
    "ensure_commitment",
    "make_salt",
]
