"""The built-in recipes of ``repair`` (YAML files; ``repair fix --recipe NAME``), shipped as the
package ``repair_recipes``. The loader is :mod:`repair.recipes`; ``repair methods`` lists them."""
