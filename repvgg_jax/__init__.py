"""repvgg-jax: RepVGG ("Making VGG-style ConvNets Great Again") in JAX/Flax.

    import repvgg_jax as rv
    model = rv.create_model('RepVGG-A0')               # training-time structure
    deploy = rv.create_model('RepVGG-A0', deploy=True)  # plain 3x3 conv + ReLU stack
    deploy_vars = rv.reparameterize(model.init(key, x))
"""

from repvgg_jax.models import RepVGG, count_params, create_model, deploy_macs
from repvgg_jax.reparam import reparameterize
from repvgg_jax.torch_io import load_torch_weights, pretrained, to_torch_state_dict
from repvgg_jax.variants import (IMAGENET_MEAN, IMAGENET_STD, VARIANTS, LayerSpec, Variant,
                                 get_variant, layer_specs, list_models)

__version__ = '0.1.0'

__all__ = [
    'IMAGENET_MEAN', 'IMAGENET_STD', 'LayerSpec', 'RepVGG', 'VARIANTS', 'Variant',
    'count_params', 'create_model', 'deploy_macs', 'get_variant', 'layer_specs', 'list_models',
    'load_torch_weights', 'pretrained', 'reparameterize', 'to_torch_state_dict',
]
