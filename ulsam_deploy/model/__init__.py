"""The model as data: ModelSpec and its position grammar, the layer tables, the options, params/MACs."""
