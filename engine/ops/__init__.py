"""Expansion operators. Schemas: ``params``; registry: ``registry``; families: ``width`` ..."""
