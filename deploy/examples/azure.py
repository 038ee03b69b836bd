"""Example config: Azure OpenAI.

Azure's URL scheme is `{endpoint}/openai/deployments/{deployment}/chat/completions?api-version=`
with the key in the `api-key` header; a Deployment's model is the Azure deployment name.
Run: `AZURE_OPENAI_ENDPOINT=https://<resource>.openai.azure.com sluicegate serve --config
deploy/examples/azure.py`.
"""
import os

from gateway.config import Deployment, Middleware, Model, Price
from middleware.auth import AuthMiddleware, StaticKey
from middleware.failover import FailoverMiddleware
from middleware.metering import MeteringMiddleware
from providers import Provider

providers = {
    "azure": Provider("azure", base_url=os.environ["AZURE_OPENAI_ENDPOINT"],
                      api_key_env="AZURE_OPENAI_API_KEY", api_version="2024-10-21"),
}
# Azure deployment names are yours to choose, so the shipped price table cannot price them by
# name: give each deployment the price of the model it runs. These are OpenAI's list prices
# for the underlying models (gateway/prices.json, vendor "openai", read 2026-11-28); use your
# Azure price sheet or agreement instead where it differs.
models: dict[str, Model | list[Deployment]] = {
    # A gpt-6.2-sol deployment. Above 272K input tokens the whole request bills at the
    # long-context rates, as on OpenAI.
    "gpt-6.2-sol": [Deployment("azure", "my-gpt-6-2-sol-deployment", price=Price(
        input_per_mtok="2.00", cached_input_per_mtok="0.10", output_per_mtok="10.00",
        long_context_threshold=272000,
        long_context=Price(input_per_mtok="4.00", cached_input_per_mtok="0.20",
                           output_per_mtok="15.00"),
        source="https://developers.openai.com/api/docs/models/gpt-6.2-sol"))],
    # A text-embedding-3-small deployment: input tokens only.
    "text-embedding-3-small": [Deployment("azure", "my-embedding-deployment", price=Price(
        input_per_mtok="0.02", output_per_mtok="0",
        source="https://developers.openai.com/api/docs/pricing"))],
}
middleware = [
    # Virtual keys: one declared here (its plaintext in $SLUICEGATE_API_KEY; only the hash is
    # kept), or store=PostgresKeyStore(dsn) for keys made with the admin API.
    Middleware(AuthMiddleware, keys=[StaticKey("my-team", key_env="SLUICEGATE_API_KEY")]),
    Middleware(MeteringMiddleware),
    Middleware(FailoverMiddleware),
]
