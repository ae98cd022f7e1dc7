"""Models from other libraries in, unstir models out (and back). Each adapter imports its library lazily:
``unstir.adapters.diffusers`` needs ``pip install 'unstir[diffusers]'``; ``unstir.adapters.karras`` needs
nothing beyond torch."""
