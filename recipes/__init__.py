"""Model and data recipes: what users replace. A recipe builds model, optimizer, loss and a
deterministic data source from a few parameters; see :mod:`recipes.base`."""
