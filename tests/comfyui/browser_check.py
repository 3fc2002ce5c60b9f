"""Drive ComfyUI's page in headless Chromium over the DevTools protocol (no browser download, no
extra package: aiohttp comes with ComfyUI's requirements, so this runs under $COMFYUI_PYTHON).

usage: browser_check.py COMFY_URL WORKFLOW_UI_JSON SCREENSHOT_PNG
Loads the page, loads the workflow onto the canvas, queues it from the page itself (so the
"iddm.progress" events reach this browser), waits for it to finish, then prints one JSON line:
console errors, what the IDDM chart and similarity panels hold, and how many chart pixels are lit.
Screenshots: SCREENSHOT (the page at 100% on IDDM Train after the run), SCREENSHOT_chart.png (the
chart alone), and the same two as SCREENSHOT_during*.png while the run was under way.
comfy_page() and the helpers below also serve the other page checks (template_browser.py).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import AsyncIterator

import aiohttp

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                  "--window-size=1600,1000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Page:
    def __init__(self, ws) -> None:
        self.ws, self.next_id, self.pending, self.console_errors = ws, 0, {}, []

    async def listen(self) -> None:
        async for message in self.ws:
            data = json.loads(message.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                details = data["params"]["exceptionDetails"]
                self.console_errors.append(details.get("exception", {}).get("description") or details.get("text"))
            elif data.get("method") == "Runtime.consoleAPICalled" and data["params"]["type"] == "error":
                self.console_errors.append(" ".join(str(a.get("value", a.get("description", "")))
                                                    for a in data["params"]["args"]))
            elif data.get("method") == "Log.entryAdded" and data["params"]["entry"]["level"] == "error":
                entry = data["params"]["entry"]
                self.console_errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}")

    async def call(self, method: str, **params):
        self.next_id += 1
        future = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        await self.ws.send_str(json.dumps({"id": self.next_id, "method": method, "params": params}))
        reply = await asyncio.wait_for(future, 120)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True,
                                 returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error in {expression[:80]!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if await self.evaluate(expression):
                return
            await asyncio.sleep(0.5)
        raise TimeoutError(f"page never satisfied {expression!r}")


@contextlib.asynccontextmanager
async def comfy_page(comfy_url: str, size: str = "1600,1000", pixel_ratio: int = 1) -> AsyncIterator[Page]:
    """ComfyUI's page in a fresh headless Chromium, once the app has loaded and the dialogs a first
    start shows are closed (as a user would)."""
    port = free_port()
    profile = tempfile.mkdtemp(prefix="iddm-chromium-")
    flags = [f for f in CHROMIUM_FLAGS if not f.startswith("--window-size=")] + [
        f"--window-size={size}", f"--force-device-scale-factor={pixel_ratio}"]
    browser = subprocess.Popen([shutil.which("chromium") or "chromium", *flags,
                                f"--remote-debugging-port={port}", f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
                        targets = [t for t in await response.json() if t["type"] == "page"]
                    if targets:
                        break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
            async with http.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                listener = asyncio.create_task(page.listen())
                for domain in ("Runtime", "Log", "Page"):
                    await page.call(f"{domain}.enable")
                await page.call("Page.navigate", url=comfy_url)
                await page.wait_for("!!(window.comfyAPI && window.comfyAPI.app && window.comfyAPI.app.app.graph "
                                    "&& window.comfyAPI.app.app.extensionManager)", 90)
                await asyncio.sleep(2)
                await page.evaluate(CLOSE_DIALOGS)
                try:
                    yield page
                finally:
                    listener.cancel()
    finally:
        browser.terminate()
        browser.wait(20)
        shutil.rmtree(profile, ignore_errors=True)


CLOSE_DIALOGS = "document.querySelectorAll('.p-dialog-close-button, button[aria-label=\"Close\"]').forEach(b => b.click())"
APP = "window.comfyAPI.app.app"


async def screenshot(page: Page, path: str, clip: tuple[float, float, float, float] | None = None) -> None:
    params = {"format": "png"}
    if clip:
        params["clip"] = dict(zip(("x", "y", "width", "height"), clip), scale=1)
    shot = await page.call("Page.captureScreenshot", **params)
    Path(path).write_bytes(base64.b64decode(shot["data"]))


async def save_chart(page: Page, path: str) -> None:
    """The chart's own canvas, at its own resolution."""
    data = await page.evaluate(f"{APP}.graph._nodes.find(n => n.type === 'IDDMTrain').iddmChart.canvas.toDataURL('image/png')")
    Path(path).write_bytes(base64.b64decode(data.split(",", 1)[1]))


async def show_node(page: Page, node_type: str, scale: float = 1.0) -> None:
    """Centre the view on the first node of a type, at a zoom (1.0 = 100%)."""
    await page.evaluate(f"""(() => {{ const app = {APP};
        const n = app.graph._nodes.find(n => n.type === {json.dumps(node_type)});
        const ds = app.canvas.ds; ds.scale = {scale};
        const box = app.canvas.canvas.getBoundingClientRect();
        ds.offset = [box.width / 2 / ds.scale - n.pos[0] - n.size[0] / 2,
                     box.height / 2 / ds.scale - n.pos[1] - n.size[1] / 2];
        app.canvas.setDirty(true, true); }})()""")
    await asyncio.sleep(1.5)


async def main(comfy_url: str, workflow_path: str, screenshot_path: str) -> dict:
    workflow = json.loads(open(workflow_path).read())
    during = screenshot_path.replace(".png", "_during.png")
    async with comfy_page(comfy_url) as page:
        loaded = await page.evaluate(f"{APP}.extensions.map(e => e.name).includes('iddm.privacy')")
        await page.evaluate(f"{APP}.loadGraphData({json.dumps(workflow)})")
        await asyncio.sleep(1)
        await show_node(page, "IDDMTrain")
        queued = await page.evaluate(f"(async () => (await {APP}.graphToPrompt()).output)()")
        await page.evaluate(f"{APP}.queuePrompt(0, 1)")
        train = f"{APP}.graph._nodes.find(n => n.type === 'IDDMTrain')"
        # During the run: once some steps are drawn and more are to come (best effort: a short run
        # on a fast machine may finish between two looks).
        seen_during = False
        try:
            await page.wait_for(f"(() => {{ const c = {train}?.iddmChart; return c && c.total && "
                                f"c.points.length >= c.total / 2; }})()", 1200)
            if not await page.evaluate(f"{train}.iddmChart.final"):
                await screenshot(page, during)
                await save_chart(page, during.replace(".png", "_chart.png"))
                seen_during = True
        except TimeoutError:
            pass
        # Finished when the train node has the run's figures and the similarity node its text.
        await page.wait_for(f"(() => {{ const c = {train}?.iddmChart; return c && c.final && c.points.length === c.total; }})()", 1200)
        await page.wait_for("(() => { const n = window.comfyAPI.app.app.graph._nodes"
                            ".find(n => n.type === 'IDDMIdentitySimilarity');"
                            " return n && n.iddmFigures && n.iddmFigures.textContent.startsWith('FSR'); })()",
                            600)
        state = await page.evaluate("""(() => {
            const g = window.comfyAPI.app.app.graph;
            const train = g._nodes.find(n => n.type === 'IDDMTrain');
            const sim = g._nodes.find(n => n.type === 'IDDMIdentitySimilarity');
            const lora = g._nodes.find(n => n.type === 'IDDMLoadProtectedLoRA');
            const c = train.iddmChart.canvas;
            const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let lit = 0;
            for (let i = 0; i < px.length; i += 4) {
                const stage2 = px[i] > 200 && px[i + 1] < 140 && px[i + 2] < 120;
                if (stage2) lit++;
            }
            return {points: train.iddmChart.points.length, total: train.iddmChart.total,
                    phases: [...new Set(train.iddmChart.points.map(p => p.phase))],
                    stage2_pixels: lit, canvas: [c.width, c.height], node_size: [...train.size],
                    saved_widget_values: train.serialize().widgets_values.length,
                    header: train.iddmChart.headerLines(), iterations: train.iddmChart.iterations(),
                    series: Object.fromEntries(train.iddmChart.constructor.SERIES.map(s => {
                        const xs = train.iddmChart.seriesPoints(s).map(p => train.iddmChart.constructor.x(p, s));
                        return [s.key, {points: xs.length, x: [Math.min(...xs), Math.max(...xs)]}]; })),
                    similarity_text: sim.iddmFigures.textContent,
                    lora_text: lora.iddmSettings.textContent};
        })()""")
        await show_node(page, "IDDMTrain")
        await screenshot(page, screenshot_path)
        await save_chart(page, screenshot_path.replace(".png", "_chart.png"))
        return {"extension_registered": loaded, "console_errors": page.console_errors,
                "during_screenshot": seen_during, "queued_prompt": queued, **state}


async def prompt_of(comfy_url: str, workflow_path: str) -> dict:
    """The API prompt the page makes of a UI-format workflow (what its Run button would queue)."""
    workflow = json.loads(open(workflow_path).read())
    async with comfy_page(comfy_url) as page:
        await page.evaluate(f"{APP}.loadGraphData({json.dumps(workflow)})")
        await asyncio.sleep(1.5)
        prompt = await page.evaluate(f"(async () => (await {APP}.graphToPrompt()).output)()")
        return {"prompt": prompt, "console_errors": page.console_errors}


if __name__ == "__main__":
    if sys.argv[3] == "--prompt":  # browser_check.py COMFY_URL WORKFLOW --prompt
        print(json.dumps(asyncio.run(prompt_of(*sys.argv[1:3]))))
    else:
        print(json.dumps(asyncio.run(main(*sys.argv[1:4]))))
