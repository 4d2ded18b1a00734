"""What one request may hold, for every entry point (TorchServe's frontend, the Open Inference Protocol server over
REST and gRPC, the page's relay); stated once here, where the runtime that enforces them ships."""

MAX_REQUEST_BYTES = 10 * 1024 * 1024  # a phone photo is 3-6 MB; larger bodies are refused before they are read
MAX_BATCH_ITEMS = 256  # images or rows in one request; a larger batch is the client's to split
MAX_TEXT_BYTES = 64 * 1024  # one text's UTF-8: a long article; tokenizing more only to truncate it is wasted work
