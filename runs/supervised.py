"""
Can each tower of the tiny preset learn each attribute of the synthetic scenes on its own?
A control for the miniature study: where contrastive training leaves an attribute at chance,
this tells a tower that cannot see it from a training signal that does not reach it.

    python -m runs.supervised                 # ~3 min on 2 cores; prints a markdown table
    python -m runs.supervised --steps=100 --families=place

Each tower gets a linear head and is trained with cross-entropy, with the study's optimizer
(AdamW, betas 0.9/0.95, weight decay 0.2, batch 64) from the same initialisation as train.py:
- image: the ViT's first token on one-object images whose class is the attribute's value
  (drawn as synthetic.py draws them, every other attribute at random);
- text: the text transformer's EOT state on the object captions of the training grammar
  ("a red circle on the left"), labelled by the attribute's value.
Accuracy is on 500 held-out images or captions.
"""
import argparse
import dataclasses
import random

import torch
import torch.nn.functional as F
from PIL import Image

import data
import model
import synthetic

VALUES = {
    'shape': synthetic.SHAPES,
    'color': tuple(synthetic.COLORS),
    'size': tuple(synthetic.SIZES),
    'place': tuple(synthetic.PLACES),
}
CAPTION = {
    'shape': 'color',
    'color': 'color',
    'size': 'size',
    'place': 'place',
}  # which caption says it


def examples(family, n, rng, config):
    """(images (n, 3, S, S), tokens (n, L), labels (n,)): one object each, `family` set to the
    label."""
    images, captions, labels = [], [], []
    for _ in range(n):
        label = rng.randrange(len(VALUES[family]))
        scene = synthetic._scene(rng, n_objects=1)
        scene['objects'][0][family] = VALUES[family][label]
        pixels = synthetic._draw(scene, rng, config.image_size)
        images.append(data.to_tensor(Image.fromarray(pixels)))
        captions.append(synthetic._say(CAPTION[family], scene['objects'][0]))
        labels.append(label)
    tokens = data.tokenize(captions, config.context_length, config.tokenizer)
    return torch.stack(images), tokens, torch.tensor(labels)


def train_probe(tower, width, inputs, labels, test_inputs, test_labels, steps, lr):
    """Tower + linear head, trained end to end; held-out accuracy."""
    head = torch.nn.Linear(width, int(labels.max()) + 1)
    params = list(tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.2)
    for _ in range(steps):
        batch = torch.randint(0, len(labels), (64,))
        loss = F.cross_entropy(head(tower(inputs[batch])), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (head(tower(test_inputs)).argmax(dim=1) == test_labels).float().mean().item()


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument('--steps', type=int, default=300, help='optimizer steps per tower and attribute')
    p.add_argument('--lr', type=float, default=3e-4, help='AdamW learning rate')
    p.add_argument(
        '--families', default='shape,color,size,place', help='attributes, comma-separated'
    )
    p.add_argument('--seed', type=int, default=0, help='data and initialisation')
    args = p.parse_args()
    config = dataclasses.replace(model.PRESETS['tiny'], pool='cls')
    print(
        f'| attribute | chance | image tower | text tower |  ({args.steps} steps, lr {args.lr:g})'
    )
    print('|---|---|---|---|')
    for family in args.families.split(','):
        rng = random.Random(f'{args.seed}/{family}')
        images, tokens, labels = examples(family, 4000, rng, config)
        test_images, test_tokens, test_labels = examples(family, 500, rng, config)
        vit = model.Llip(config, seed=args.seed).visual   # train.py's initial weights
        image_acc = train_probe(FirstToken(vit), config.vision_width, images, labels, test_images,
                                test_labels, args.steps, args.lr)
        text = model.Llip(config, seed=args.seed).text
        text_acc = train_probe(text, config.text_width, tokens, labels, test_tokens, test_labels,
                               args.steps, args.lr)
        print(
            f'| {family} | {1 / len(VALUES[family]):.2f} | {image_acc:.2f} | {text_acc:.2f} |',
            flush=True,
        )


class FirstToken(torch.nn.Module):
    """The ViT's first output token, what pool=cls projects: (N, 3, S, S) -> (N, W_v)."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, images):
        return self.vit(images)[:, 0]


if __name__ == '__main__':
    main()
