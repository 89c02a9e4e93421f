"""Training and averaging: the round clock, the inner loop, DiLoCo's outer step and the consensus all-reduce.

* :mod:`peer.training.clock` — which round it is and its seed (wall clock; the chain clock is in
  :mod:`peer.chain.clock`).
* :mod:`peer.training.trainer` — one round as a recipe of named steps.
* :mod:`peer.training.swarm` — the hivemind DHT, matchmaking and state agreement.
* :mod:`peer.training.allreduce` — the consensus all-reduce (bit-identical results, robust reducer).
* :mod:`peer.training.diloco` — pseudo-gradients and the outer optimizer.
* :mod:`peer.training.sync` — the synchronous alternative (hivemind ``Optimizer``).
* :mod:`peer.training.behaviour` — fault injection for incentive studies.
"""
