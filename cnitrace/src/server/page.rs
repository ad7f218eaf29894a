//! The page at `/`: the live breakdown as a stacked bar per component, the sessions, and a
//! session's breakdown with its flame graph. Self-contained: no external resources.

/// The page with the taxonomy's colours filled in (the same as the lab's SVG charts).
pub fn index() -> String {
    let colours: serde_json::Map<String, serde_json::Value> = crate::components::COMPONENTS
        .iter()
        .map(|c| (c.name.to_owned(), c.colour.into()))
        .collect();
    TEMPLATE.replace(
        "__COLOURS__",
        &serde_json::Value::Object(colours).to_string(),
    )
}

const TEMPLATE: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cnitrace</title>
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em} h2{font-size:1.1em;margin-top:1.5em}
.bar{display:flex;height:38px;width:100%;max-width:900px;border:1px solid #999}
.seg{height:100%;overflow:hidden;color:#fff;font-size:11px;line-height:38px;text-align:center;white-space:nowrap}
table{border-collapse:collapse;margin-top:.5em} td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
td:first-child,th:first-child{text-align:left} .muted{color:#777} button{margin-left:.5em}
.legend span{display:inline-block;margin-right:1em} .sw{display:inline-block;width:10px;height:10px;margin-right:3px}
</style></head><body>
<h1>cnitrace <span id="node" class="muted"></span></h1>
<div id="auth" style="display:none">Token: <input id="token" type="password"><button onclick="saveToken()">use</button></div>
<h2>Live: last <span id="win">10</span> s <span id="status" class="muted"></span></h2>
<div id="live-bar" class="bar"></div><div id="live-legend" class="legend"></div><div id="live-table"></div>
<h2>Datapath CPP over the last minutes <span class="muted">(one point per poll; <code>other</code> left out)</span></h2>
<svg id="series" width="900" height="180" style="max-width:100%;border:1px solid #ccc"></svg>
<h2>Sessions <button onclick="startSession()">start</button></h2>
<table id="sessions"><tr><th>id</th><th>state</th><th>started</th><th></th></tr></table>
<h2 id="session-title"></h2>
<div id="session-bar" class="bar" style="display:none"></div><div id="session-legend" class="legend"></div><div id="session-table"></div>
<p id="session-flame-note" class="muted"></p>
<iframe id="session-flame" title="flame graph" sandbox="allow-scripts" style="display:none;width:100%;max-width:1200px;height:520px;border:1px solid #ccc"></iframe>
<script>
const COLORS=__COLOURS__;
function headers(){const t=sessionStorage.getItem("cnitrace-token");return t?{"Authorization":"Bearer "+t}:{};}
function saveToken(){sessionStorage.setItem("cnitrace-token",document.getElementById("token").value);document.getElementById("auth").style.display="none";refresh();}
async function api(path,opts={}){const r=await fetch(path,{...opts,headers:{...headers(),"Content-Type":"application/json"}});
 if(r.status===401){document.getElementById("auth").style.display="block";throw new Error("token needed");}
 const body=await r.json(); if(!r.ok) throw new Error(body.error||r.status); return body;}
function fmt(x){return x==null?"-":x.toFixed(1);}
function draw(b,prefix){
 const bar=document.getElementById(prefix+"-bar"); bar.style.display="flex"; bar.innerHTML="";
 const legend=document.getElementById(prefix+"-legend"); legend.innerHTML="";
 let rows="<table><tr><th>component</th><th>CPP</th><th>share</th></tr>";
 for(const c of b.components){
  if(c.share>0){const s=document.createElement("div");s.className="seg";s.dataset.component=c.name;
   s.style.width=(c.share*100)+"%";s.style.background=COLORS[c.name]||"#666";s.title=c.name+" "+fmt(c.cpp)+" CPP";
   s.textContent=c.share>0.06?c.name:"";bar.appendChild(s);
   legend.innerHTML+='<span><i class="sw" style="background:'+(COLORS[c.name]||"#666")+'"></i>'+c.name+'</span>';}
  rows+="<tr><td>"+c.name+(c.available?"":" (unavailable)")+"</td><td>"+fmt(c.cpp)+"</td><td>"+(c.share*100).toFixed(1)+"%</td></tr>";
  for(const s of (b.subcomponents||[]).filter(s=>s.name.startsWith(c.name+".")&&s.cycles>0))
   rows+='<tr class="muted"><td>&nbsp;&nbsp;'+s.name+"</td><td>"+fmt(s.cpp)+"</td><td>"+(s.share*100).toFixed(1)+"%</td></tr>";}
 rows+="<tr><th>total</th><th>"+fmt(b.total.cpp)+"</th><th>"+b.packets.count+" "+b.packets.unit+"s</th></tr></table>";
 document.getElementById(prefix+"-table").innerHTML=rows;}
// The datapath components' CPP of each poll, kept here for ten minutes, as stacked areas.
const HISTORY=[];
function drawSeries(){const svg=document.getElementById("series"),W=900,H=180,P=30;
 if(HISTORY.length<2){svg.innerHTML='<text x="10" y="20" fill="#777">collecting...</text>';return;}
 const names=Object.keys(COLORS).filter(n=>n!=="other"),t0=HISTORY[0].t,t1=HISTORY[HISTORY.length-1].t;
 const max=Math.max(1,...HISTORY.map(h=>names.reduce((s,n)=>s+(h.cpp[n]||0),0)));
 const x=t=>P+(W-P-5)*(t-t0)/Math.max(1,t1-t0),y=v=>H-20-(H-30)*v/max;let out="",base=HISTORY.map(()=>0);
 for(const n of names){const top=HISTORY.map((h,i)=>base[i]+(h.cpp[n]||0));if(top.every((v,i)=>v===base[i]))continue;
  const pts=HISTORY.map((h,i)=>x(h.t)+","+y(top[i])).concat(HISTORY.map((h,i)=>x(h.t)+","+y(base[i])).reverse());
  out+='<polygon points="'+pts.join(" ")+'" fill="'+COLORS[n]+'"><title>'+n+'</title></polygon>';base=top;}
 out+='<text x="2" y="14" font-size="11">'+max.toFixed(0)+' CPP</text><text x="2" y="'+(H-22)+'" font-size="11">0</text>';
 out+='<text x="'+(W-60)+'" y="'+(H-5)+'" font-size="11" fill="#777">'+Math.round((t1-t0)/1000)+' s</text>';svg.innerHTML=out;}
async function refreshLive(){try{const b=await api("/api/v1/breakdown?window=10");draw(b,"live");
 const cpp={};for(const c of b.components)cpp[c.name]=c.cpp||0;HISTORY.push({t:Date.now(),cpp});
 while(HISTORY.length&&Date.now()-HISTORY[0].t>600000)HISTORY.shift();drawSeries();
 document.getElementById("node").textContent=b.node+" · "+b.kernel+" · "+b.backend;document.getElementById("status").textContent="";}
 catch(e){document.getElementById("status").textContent=e.message;}}
async function refreshSessions(){try{const list=await api("/api/v1/sessions");const t=document.getElementById("sessions");
 t.innerHTML="<tr><th>id</th><th>state</th><th>started</th><th></th></tr>";
 for(const s of list){const tr=document.createElement("tr");tr.innerHTML="<td>"+s.id+"</td><td>"+s.state+"</td><td>"+s.started+"</td><td></td>";
  const b=document.createElement("button");b.textContent=s.state==="running"?"stop":"show";
  b.onclick=()=>s.state==="running"?stopSession(s.id):showSession(s.id);tr.lastChild.appendChild(b);t.appendChild(tr);}}catch(e){}}
async function startSession(){await api("/api/v1/sessions",{method:"POST",body:"{}"});refreshSessions();}
async function stopSession(id){await api("/api/v1/sessions/"+id+"/stop",{method:"POST"});refreshSessions();showSession(id);}
async function showSession(id){const s=await api("/api/v1/sessions/"+id);document.getElementById("session-title").textContent="Session "+id+" ("+s.state+")";
 if(s.breakdown){draw(s.breakdown,"session");showFlame(id);}}
// The flame graph needs the token, so it is fetched and shown from a local blob (its search
// and zoom scripts run inside the frame, sandboxed: an opaque origin that cannot read the
// token, which lives in this tab's sessionStorage only).
async function showFlame(id){const frame=document.getElementById("session-flame"),note=document.getElementById("session-flame-note");
 const r=await fetch("/api/v1/sessions/"+id+"/flamegraph.svg",{headers:headers()});
 if(!r.ok){frame.style.display="none";note.textContent="no flame graph: "+((await r.json()).error||r.status);return;}
 note.textContent="Where the cycles went, stack by stack (frames in their component's colour; click to zoom, Ctrl-F to search):";
 frame.src=URL.createObjectURL(new Blob([await r.text()],{type:"image/svg+xml"}));frame.style.display="block";}
function refresh(){refreshLive();refreshSessions();}
// A token in the fragment (never sent to the server) is stored for the API calls.
const frag=new URLSearchParams(location.hash.slice(1)); if(frag.get("token")){sessionStorage.setItem("cnitrace-token",frag.get("token"));history.replaceState(null,"",location.pathname+location.search);}
const q=new URLSearchParams(location.search); if(q.get("session"))showSession(q.get("session"));
refresh(); setInterval(refresh,3000);
</script></body></html>
"##;
