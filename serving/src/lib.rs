//! `llmo-serve`: the serving engine that the llmo operator launches on every node.
