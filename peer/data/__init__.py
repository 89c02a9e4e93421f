"""Data and model: the corpus, its tokenizer and fixed-size pages, page assignment, and the model.

* :mod:`peer.data.pages` — corpus preparation, :class:`~peer.data.pages.PageStore`, ``assign_pages``,
  ``eval_pages`` and ``round_batches`` (pure functions every peer and validator share).
* :mod:`peer.data.shards` — the sharded data set format (manifest + token shards + page indexes),
  :class:`~peer.data.shards.ShardedPageStore` (lazy, verified reads) and ``open_page_store`` (``--data``).
* :mod:`peer.data.fetcher` — resumable, retried, sha256-verified HTTP(S) downloads into a cache.
* :mod:`peer.data.build` / :mod:`peer.data.cli` — ``peer data build|info|fetch``.
* :mod:`peer.data.model` — the HF Llama built from a typed config with a seeded init.

``python -m peer.data fetch-corpus --dest DIR`` installs the offline corpus.
"""
