"""The baseline: what TorchServe's stock MNIST example handler does (decode, ToTensor, Normalize, argmax).

The stock file subclasses ImageClassifier, whose module imports captum; this is the same work on
BaseHandler, so the baseline runs without captum. No batching, default workers and threads.
"""

import base64
import io

import torch
from PIL import Image
from torchvision import transforms
from ts.torch_handler.base_handler import BaseHandler


class MNISTDigitClassifier(BaseHandler):
    image_processing = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])

    def preprocess(self, data):
        images = []
        for row in data:
            image = row.get("data") or row.get("body")
            if isinstance(image, str):
                image = base64.b64decode(image)
            images.append(self.image_processing(Image.open(io.BytesIO(image))))
        return torch.stack(images).to(self.device)

    def postprocess(self, data):
        return data.argmax(1).tolist()
