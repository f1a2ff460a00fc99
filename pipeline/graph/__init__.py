"""The float graph: any traceable CNN as typed nodes in topological order, BatchNorm folded, activations fused.

- ``nodes``: the node types, ``FloatGraph``, and queries and copies of a graph (layers, consumers, weights);
- ``capture``: ``capture(model)`` traces a model into a ``FloatGraph``, ``observe_original`` runs its trace;
- ``rewrite``: BatchNorm folding and activation fusion;
- ``run``: ``run_float``, the graph in float.

Nothing is re-exported here: each module imports the submodule it runs, so a DVC stage depends on
exactly the files it executes.
"""
