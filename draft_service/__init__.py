"""The draft worker: a small model that proposes blocks of k candidate tokens."""
