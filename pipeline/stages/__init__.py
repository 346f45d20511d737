"""The four stages, each read top to bottom with its report beside it: prep, train, evaluate, push."""
