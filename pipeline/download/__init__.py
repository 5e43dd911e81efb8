"""The download stage: input normalisation (one file or parts), the URL guard, img2dataset, the demo."""
