"""Chain fixtures: LocalLedger per test, and one Chopsticks node (the real subtensor runtime) per session.

The Chopsticks kit is copied from ``../shared/chain`` (read-only in CI) into ``.cache/chopsticks`` and
``npm ci``-installed there once (``make chain-kit``; ~100 s). The node runs on 127.0.0.1 with a free
port, dies with pytest (PR_SET_PDEATHSIG) and is stopped at session end, also on failure. Session-wide
setup (subnet, registrations, stake) happens once; each test then runs from a snapshot and is rolled
back with ``dev_setHead``.

If node/npm or ``../shared/chain`` is missing, the ``chain`` tests skip with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from substrateinterface import Keypair

from peer.chain.base import SubnetParams
from peer.chain.devnode import ChopsticksNode, kit_problem, start_chopsticks

TAO = 10**9
HUGE_BLOCK_TIME = 10_000.0  # LocalLedger in contract tests: the head moves only through advance()

# the same subnet on both implementations
TEMPO = 4
BURN = TAO  # the runtime's default burn for a new subnet; LocalLedger contract subnets use the same


@dataclass
class ChainEnv:
    """One subnet on one implementation, with funded keys and registered neurons, for contract tests."""

    kind: str
    chain: object
    netuid: int
    admin: Keypair
    """Changes subnet parameters: the sudo key (substrate) or the subnet owner (LocalLedger)."""
    coldkey: Keypair
    """Funded coldkey owning the validator and miners."""
    validator: Keypair
    miners: list[Keypair]
    stake_netuid: int
    """Where validator stake goes: root (0) on the runtime (1:1), the subnet on LocalLedger."""
    extra: dict = field(default_factory=dict)

    def advance(self, n: int) -> int:
        return self.chain.advance(n) if n > 0 else self.chain.block()

    def land_at(self, block: int) -> None:
        """Advance so that the next write lands in ``block`` (runtime: head + 1; LocalLedger: head)."""
        offset = 1 if self.kind == "substrate" else 0
        self.advance(block - offset - self.chain.block())

    def set_params(self, **changes) -> None:
        self.chain.set_hyperparameters(self.netuid, self.admin, **changes)


def _setup_subnet(chain, kind: str, owner: Keypair, coldkey: Keypair, sudo: Keypair | None) -> ChainEnv:
    owner_hk = Keypair.create_from_uri(f"//gradswarm-owner-hk-{kind}")
    validator = Keypair.create_from_uri(f"//gradswarm-validator-{kind}")
    miners = [Keypair.create_from_uri(f"//gradswarm-miner{i}-{kind}") for i in range(2)]
    if kind == "substrate":
        netuid = chain.create_subnet(
            owner,
            SubnetParams(
                tempo=TEMPO,
                weights_rate_limit=0,
                extra={"target_registrations_per_interval": 100, "max_registrations_per_block": 100},
            ),
            owner_hotkey=owner_hk,
            sudo_key=sudo,
        )
    else:
        netuid = chain.create_subnet(
            owner, SubnetParams(tempo=TEMPO, weights_rate_limit=0, burn=BURN), owner_hotkey=owner_hk
        )
    for hk in [validator, *miners]:
        chain.register(netuid, hk, coldkey, burn=True)
    stake_netuid = 0 if kind == "substrate" else netuid
    chain.add_stake(stake_netuid, validator.ss58_address, coldkey, 100 * TAO)
    return ChainEnv(
        kind=kind,
        chain=chain,
        netuid=netuid,
        admin=sudo or owner,
        coldkey=coldkey,
        validator=validator,
        miners=miners,
        stake_netuid=stake_netuid,
    )


@pytest.fixture(scope="session")
def chopsticks() -> Iterator[ChopsticksNode]:
    problem = kit_problem()
    if problem:
        pytest.skip(problem)
    node = start_chopsticks()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def substrate_session(chopsticks):
    from peer.chain.substrate import SubstrateChain

    chain = SubstrateChain(chopsticks.url, timeout=120)
    try:
        alice, bob = Keypair.create_from_uri("//Alice"), Keypair.create_from_uri("//Bob")
        env = _setup_subnet(chain, "substrate", alice, bob, alice)
        env.extra["snapshot"] = chain.snapshot()
        yield env
    finally:
        chain.close()


@pytest.fixture
def substrate_env(substrate_session) -> Iterator[ChainEnv]:
    env = substrate_session
    try:
        yield env
    finally:
        env.chain.rollback(env.extra["snapshot"])


@pytest.fixture
def local_env(tmp_path) -> Iterator[ChainEnv]:
    from peer.chain.local import LocalLedger

    ledger = LocalLedger(tmp_path / "ledger.sqlite", block_time=HUGE_BLOCK_TIME)
    try:
        owner = Keypair.create_from_uri("//Alice")
        coldkey = Keypair.create_from_uri("//Bob")
        ledger.fund(coldkey.ss58_address, 10**6 * TAO)
        yield _setup_subnet(ledger, "local", owner, coldkey, None)
    finally:
        ledger.close()


@pytest.fixture(params=["local", pytest.param("substrate", marks=pytest.mark.chain)])
def env(request) -> ChainEnv:
    """The contract-suite parameter: the same subnet on LocalLedger and on the real runtime."""
    return request.getfixturevalue(f"{request.param}_env")
