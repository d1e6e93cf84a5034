"""The language model side: family adapters, every hook clt_hub puts on a model, the frozen forward, loading."""
