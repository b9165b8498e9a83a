"""A Gradio chat app for models (label -> model folder or hub id), to try them by hand before trusting a score; the
`chat` stage (`pipeline/stages/chat.py`) serves it for a recipe's models.

One tab chats with one model, tokens streaming as they are generated; the other sends the same message to two
models and shows both answers side by side. A system prompt, the temperature (0: greedy), top-p and the maximum of
new tokens apply to both. Each model is prompted with its own folder's chat template and stops on its generation
config's end-of-sequence ids and its tokenizer's. Nothing is sent anywhere: no share link, analytics off, no web
fonts. `build_app` and `serve` make the app without doit (the tests use them); its named API endpoints are `/chat`
(message, history, model, system prompt, temperature, top-p, max new tokens → history) and `/side_by_side`
(message, history A, history B, model A, model B, system prompt, temperature, top-p, max new tokens → history A,
history B). Gradio, torch and transformers are imported when the app is made or a model loaded.
"""
from __future__ import annotations

import os
import queue
import threading

from pipeline.errors import TunebuildError

DEFAULT_MAX_NEW_TOKENS = 256


# -- the models -----------------------------------------------------------------------------------------------

def _text(content) -> str:
    """A chat message's text: a string, or Gradio's content blocks ([{"type": "text", "text": ...}, ...])."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(_text(c) for c in content)
    return ""


def _plain(history) -> list[dict]:
    """A Chatbot value as plain {role, content: str} messages (files and tool metadata dropped)."""
    out = []
    for m in history or []:
        if isinstance(m, dict) and m.get("role") in ("user", "assistant", "system"):
            out.append({"role": m["role"], "content": _text(m.get("content"))})
    return out


def stop_ids(model, tokenizer) -> list[int]:
    """The ids generation stops on: the generation config's eos ids, then the tokenizer's eos."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    for value in ([*eos] if isinstance(eos, (list, tuple)) else [eos]) + [tokenizer.eos_token_id]:
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids


def prompt_text(tokenizer, messages: list[dict]) -> str:
    """The prompt in the model's own chat template, ending with the assistant's turn opening."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # no chat template in the folder (a plain base model): role-prefixed turns
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


_LOADING = threading.Lock()   # one import or model load at a time: transformers' lazy imports are not thread-safe
_LIBS: tuple | None = None


def _libs():
    """(torch, TextIteratorStreamer, load_causal_lm), imported once under the loading lock."""
    global _LIBS
    if _LIBS is None:
        with _LOADING:
            if _LIBS is None:
                import torch
                from transformers import TextIteratorStreamer

                from pipeline.models.hf import load_causal_lm

                _LIBS = (torch, TextIteratorStreamer, load_causal_lm)
    return _LIBS


class Models:
    """The app's models by label, each loaded on first use (or by `preload`) and kept; loads happen one at a time
    (two chats asking for one model load it once)."""

    def __init__(self, locations: dict[str, str]):
        self.locations = dict(locations)
        self._loaded: dict[str, tuple] = {}

    def get(self, label: str):
        if label not in self.locations:
            raise TunebuildError(f"unknown model {label!r} (known: {', '.join(self.locations)})")
        if label not in self._loaded:
            load_causal_lm = _libs()[2]
            with _LOADING:
                if label not in self._loaded:
                    model, tok = load_causal_lm(self.locations[label])
                    model.eval()
                    self._loaded[label] = (model, tok)
        return self._loaded[label]

    def preload(self, labels) -> threading.Thread:
        """Load `labels` in a background thread, so the first answer does not wait for them."""
        def load():
            for label in labels:
                try:
                    self.get(label)
                except Exception as e:  # noqa: BLE001  the chat that asks for it shows the error
                    print(f"chat: {label}: {str(e).splitlines()[0] if str(e) else type(e).__name__}", flush=True)

        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        return worker

    def stream(self, label: str, messages: list[dict], *, temperature: float = 0.0, top_p: float = 1.0,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        """Yield the answer so far, token by token (TextIteratorStreamer, generation in a thread)."""
        torch, TextIteratorStreamer, _ = _libs()
        model, tok = self.get(label)
        ids = tok(prompt_text(tok, messages), return_tensors="pt", add_special_tokens=False)["input_ids"]
        ids = ids.to(model.device)
        stops = stop_ids(model, tok)
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(max_new_tokens),
                      eos_token_id=stops, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else stops[0],
                      streamer=streamer)
        if temperature and temperature > 0:
            kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        failed: list[BaseException] = []

        def generate():
            try:
                with torch.inference_mode():
                    model.generate(**kwargs)
            except BaseException as e:  # noqa: BLE001  reported by the consumer below
                failed.append(e)
                streamer.end()

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        text = ""
        for piece in streamer:
            text += piece
            yield text
        worker.join()
        if failed:
            raise failed[0]


def _messages(system: str, history: list[dict], message: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system and system.strip() else []) + history + \
        [{"role": "user", "content": message}]


def _pair(streams):
    """Run two streams at once; yield (text A, text B) whenever either grows."""
    q: queue.Queue = queue.Queue()

    def pump(side, stream):
        try:
            for text in stream:
                q.put((side, text, None))
            q.put((side, None, None))
        except BaseException as e:  # noqa: BLE001
            q.put((side, None, e))

    for side, stream in enumerate(streams):
        threading.Thread(target=pump, args=(side, stream), daemon=True).start()
    texts, done = ["", ""], 0
    while done < 2:
        side, text, error = q.get()
        if error is not None:
            raise error
        if text is None:
            done += 1
        else:
            texts[side] = text
            yield tuple(texts)


# -- the app --------------------------------------------------------------------------------------------------

def load_gradio():
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"   # before the import: no telemetry, no version check
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import gradio as gr

    return gr


PRIVATE = {"api_visibility": "private"}   # event kwargs for the page's internal steps: not in the API


def _block(text: str) -> list[dict]:
    """A message's text as a Chatbot text block: shown as the model wrote it (a plain string would go through
    `inspect.cleandoc`, losing leading blank lines and indentation)."""
    return [{"type": "text", "text": text}]


def _theme(gr):
    """The default theme with the system's fonts: the page loads nothing from Google Fonts."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


def build_app(models: dict[str, str], examples: list[str] = (), *, default: str | None = None,
              title: str = "tunebuild chat"):
    """The Gradio Blocks app for `models` (label -> model folder or hub id), with `examples` as example prompts.
    `default` (else the first model after `base`) is the chat tab's model and model B of the side-by-side tab
    (model A: the first, `base`). Named endpoints: `/chat` and `/side_by_side` (see the module docstring)."""
    gr = load_gradio()
    if not models:
        raise TunebuildError("no models to chat with")
    engine = Models(models)
    labels = list(models)
    if default is not None and default not in models:
        raise TunebuildError(f"default model {default!r} is not one of {', '.join(labels)}")
    second = default or next((label for label in labels if label != "base"), labels[0])

    def shown(history: list[dict], *turns: tuple[str, str]) -> list[dict]:
        """Plain messages (and new turns) as the Chatbot's value."""
        return [{"role": r, "content": _block(t)} for r, t in [(m["role"], m["content"]) for m in history] + [*turns]]

    def fail(e: Exception):
        return gr.Error(str(e).splitlines()[0] if str(e) else type(e).__name__)

    def chat(message, history, model, system, temperature, top_p, max_new_tokens):
        history = _plain(history)
        if not (message or "").strip():
            yield shown(history)
            return
        yield shown(history, ("user", message), ("assistant", ""))
        try:
            for text in engine.stream(model, _messages(system, history, message), temperature=temperature,
                                      top_p=top_p, max_new_tokens=max_new_tokens):
                yield shown(history, ("user", message), ("assistant", text))
        except Exception as e:  # noqa: BLE001  shown in the page, the app keeps serving
            raise fail(e) from None

    def side_by_side(message, history_a, history_b, model_a, model_b, system, temperature, top_p,
                     max_new_tokens):
        history_a, history_b = _plain(history_a), _plain(history_b)
        if not (message or "").strip():
            yield shown(history_a), shown(history_b)
            return
        yield shown(history_a, ("user", message), ("assistant", "")), \
            shown(history_b, ("user", message), ("assistant", ""))
        settings = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        try:
            for a, b in _pair([engine.stream(model_a, _messages(system, history_a, message), **settings),
                               engine.stream(model_b, _messages(system, history_b, message), **settings)]):
                yield shown(history_a, ("user", message), ("assistant", a)), \
                    shown(history_b, ("user", message), ("assistant", b))
        except Exception as e:  # noqa: BLE001
            raise fail(e) from None

    def take(message):
        return "", message

    where = " · ".join(f"**{label}** `{location}`" for label, location in models.items())
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## {title}\n{where}")
        with gr.Row():
            with gr.Column(scale=1, min_width=240):
                system = gr.Textbox("", label="System prompt", lines=3, placeholder="(none)")
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature",
                                        info="0: greedy (the evaluations' decoding)")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                max_new_tokens = gr.Slider(1, 2048, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="Max new tokens")
            with gr.Column(scale=3):
                with gr.Tab("Chat"):
                    model = gr.Dropdown(labels, value=second, label="Model")
                    chatbot = gr.Chatbot(label="Chat", height=340)
                    message = gr.Textbox(label="Message", placeholder="Ask something, Enter sends", lines=1)
                    pending = gr.Textbox(visible=False)
                    with gr.Row():
                        send = gr.Button("Send", variant="primary")
                        clear = gr.Button("Clear")
                    if examples:
                        gr.Examples([[e] for e in examples], inputs=[message], label="Example prompts")
                with gr.Tab("Side by side"):
                    with gr.Row():
                        model_a = gr.Dropdown(labels, value=labels[0], label="Model A")
                        model_b = gr.Dropdown(labels, value=second, label="Model B")
                    with gr.Row():
                        chatbot_a = gr.Chatbot(label="A", height=300)
                        chatbot_b = gr.Chatbot(label="B", height=300)
                    message_2 = gr.Textbox(label="Message (sent to both)", placeholder="Ask both, Enter sends",
                                           lines=1)
                    pending_2 = gr.Textbox(visible=False)
                    with gr.Row():
                        send_2 = gr.Button("Send to both", variant="primary")
                        clear_2 = gr.Button("Clear")
                    if examples:
                        gr.Examples([[e] for e in examples], inputs=[message_2], label="Example prompts")

        chat_inputs = [pending, chatbot, model, system, temperature, top_p, max_new_tokens]
        pair_inputs = [pending_2, chatbot_a, chatbot_b, model_a, model_b, system, temperature, top_p, max_new_tokens]
        for i, trigger in enumerate((message.submit, send.click)):
            event = trigger(take, [message], [message, pending], queue=False, **PRIVATE)
            event.then(chat, chat_inputs, [chatbot], **({"api_name": "chat"} if i == 0 else PRIVATE))
        for i, trigger in enumerate((message_2.submit, send_2.click)):
            event = trigger(take, [message_2], [message_2, pending_2], queue=False, **PRIVATE)
            event.then(side_by_side, pair_inputs, [chatbot_a, chatbot_b],
                       **({"api_name": "side_by_side"} if i == 0 else PRIVATE))
        clear.click(lambda: [], None, [chatbot], queue=False, **PRIVATE)
        clear_2.click(lambda: ([], []), None, [chatbot_a, chatbot_b], queue=False, **PRIVATE)
    app.tunebuild_models = engine
    app.tunebuild_defaults = list(dict.fromkeys([labels[0], second]))   # what the page starts with
    return app


def serve(models: dict[str, str], examples: list[str] = (), *, default: str | None = None,
          title: str = "tunebuild chat", server_name: str | None = None, server_port: int | None = None,
          block: bool = True, preload: bool = True):
    """Launch the app on `server_name` (else GRADIO_SERVER_NAME, else 127.0.0.1) and `server_port` (else Gradio's
    choice: GRADIO_SERVER_PORT, else 7860 or the next free port); never shared. With block=True serve until
    Ctrl-C (the server is closed, then KeyboardInterrupt raised), else return the running app (stop it with
    `app.close()`). With preload, the models the page starts with (base and `default`) load in the background
    once the app is up."""
    gr = load_gradio()
    app = build_app(models, examples, default=default, title=title)
    try:
        app.queue(default_concurrency_limit=4)
        app.launch(share=False, server_name=server_name or os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   server_port=server_port, prevent_thread_lock=True, inbrowser=False, quiet=True, show_error=True,
                   ssr_mode=False, mcp_server=False, pwa=False, theme=_theme(gr))
        print(f"{title}: {', '.join(models)} on {app.local_url} (Ctrl-C stops)", flush=True)
        if preload:
            app.tunebuild_models.preload(app.tunebuild_defaults)
        if block:
            threading.Event().wait()   # until Ctrl-C (not Gradio's block_thread: it swallows it, with its own line)
    except KeyboardInterrupt:
        app.close(verbose=False)
        raise
    return app
