"""Drive ComfyUI's page in headless Chromium over the DevTools protocol (no browser download, no
extra package: aiohttp comes with ComfyUI's requirements, so this runs under $COMFYUI_PYTHON).

usage: browser_check.py COMFY_URL WORKFLOW_UI_JSON SCREENSHOT_PNG
(the chart alone goes to SCREENSHOT_chart.png). Loads the page, loads the workflow onto the canvas, queues it from the page itself (so the
"iddm.progress" events reach this browser), waits for it to finish, then prints one JSON line:
console errors, what the IDDM chart and similarity panels hold, and how many chart pixels are lit.
"""
from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time

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


async def main(comfy_url: str, workflow_path: str, screenshot: str) -> dict:
    workflow = json.loads(open(workflow_path).read())
    port = free_port()
    profile = tempfile.mkdtemp(prefix="iddm-chromium-")
    browser = subprocess.Popen([shutil.which("chromium") or "chromium", *CHROMIUM_FLAGS,
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
                loaded = await page.evaluate(
                    "window.comfyAPI.app.app.extensions.map(e => e.name).includes('iddm.privacy')")
                # First start shows a template browser over the canvas; close it like a user would.
                await page.evaluate("document.querySelectorAll('.p-dialog-close-button, "
                                    "button[aria-label=\"Close\"]').forEach(b => b.click())")
                await page.evaluate(f"window.comfyAPI.app.app.loadGraphData({json.dumps(workflow)})")
                await asyncio.sleep(1)
                await page.evaluate("window.comfyAPI.app.app.queuePrompt(0, 1)")
                # Finished when the queue is empty again and the train node has its ui output.
                await page.wait_for("(() => { const g = window.comfyAPI.app.app.graph;"
                                    " const n = g._nodes.find(n => n.type === 'IDDMTrain');"
                                    " return n && n.iddmChart && n.iddmChart.points.length > 0 &&"
                                    " n.iddmChart.points.length === n.iddmChart.total; })()", 1200)
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
                            stage2_pixels: lit, canvas: [c.width, c.height],
                            saved_widget_values: train.serialize().widgets_values.length,
                            chart_png: c.toDataURL('image/png'),
                            similarity_text: sim.iddmFigures.textContent,
                            lora_text: lora.iddmSettings.textContent};
                })()""")
                # Centre the view on the train node so the screenshot shows the chart.
                await page.evaluate("""(() => { const app = window.comfyAPI.app.app;
                    const n = app.graph._nodes.find(n => n.type === 'IDDMTrain');
                    const ds = app.canvas.ds; ds.scale = 0.8;
                    const bottom = n.pos[1] + n.size[1];
                    ds.offset = [-n.pos[0] + 500, -bottom + 900]; app.canvas.setDirty(true, true); })()""")
                await asyncio.sleep(1.5)
                shot = await page.call("Page.captureScreenshot", format="png")
                open(screenshot, "wb").write(base64.b64decode(shot["data"]))
                chart = state.pop("chart_png").split(",", 1)[1]
                open(screenshot.replace(".png", "_chart.png"), "wb").write(base64.b64decode(chart))
                listener.cancel()
                return {"extension_registered": loaded, "console_errors": page.console_errors, **state}
    finally:
        browser.terminate()
        browser.wait(20)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:4]))))
