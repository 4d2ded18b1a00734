"""kserve's own ModelServer running our model (`python -m torchship.handlers.kserve`); torchship's OIP server is the
faster path."""
