"""The HTTP APIs (docs/http.md): the OpenAI and Ollama dialects, each a thin
translation onto ``anemlld.service``, served by uvicorn on one thread of the
daemon process."""
