"""Example config: Azure OpenAI.

Azure's URL scheme is `{endpoint}/openai/deployments/{deployment}/chat/completions?api-version=`
with the key in the `api-key` header; a Deployment's model is the Azure deployment name.
Run: `AZURE_OPENAI_ENDPOINT=https://<resource>.openai.azure.com sluicegate serve --config
deploy/examples/azure.py`.
"""
import os

from gateway.config import Deployment, Middleware, Model
from middleware.auth import AuthMiddleware
from middleware.failover import FailoverMiddleware
from middleware.metering import MeteringMiddleware
from providers import Provider

providers = {
    "azure": Provider("azure", base_url=os.environ["AZURE_OPENAI_ENDPOINT"],
                      api_key_env="AZURE_OPENAI_API_KEY", api_version="2024-10-21"),
}
models: dict[str, Model | list[Deployment]] = {
    "gpt-4o": [Deployment("azure", "my-gpt-4o-deployment")],
    "text-embedding-3-small": [Deployment("azure", "my-embedding-deployment")],
}
middleware = [
    Middleware(AuthMiddleware),
    Middleware(MeteringMiddleware),
    Middleware(FailoverMiddleware),
]
