"""A checkpoint's life after its commit: what is kept, what goes, and how it goes.

- ``retention``: ``RetentionPolicy``, ``plan_retention`` (pure), ``prune``.
- ``deletion``: the deletion protocol: marker first, durably; a delta before its parent.
- ``cleanup``: incomplete saves found and removed; corrupt checkpoints moved aside.
- ``preemption``: ``PreemptionGuard``, ``save_final_checkpoint``.
"""
