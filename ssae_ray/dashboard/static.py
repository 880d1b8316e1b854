"""The dashboard's inline CSS and the index page's JavaScript (no CDN, no server, no storage API:
pages open from a file and inside MLflow's sandboxed artifact viewer)."""

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.2em 2em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.4em}
table{border-collapse:collapse;font-size:13px}th,td{padding:2px 8px;border-bottom:1px solid #eee;text-align:left;
vertical-align:top}th{background:#f5f5f5;cursor:pointer;position:sticky;top:0}td.n{text-align:right;
font-variant-numeric:tabular-nums}.ctx{font-family:ui-monospace,monospace;white-space:pre-wrap;
border-left:3px solid #ddd;padding:2px 8px;margin:3px 0}.ctx b{font-weight:normal;border-radius:2px;background:rgba(255,90,40,var(--a))}.muted{color:#777}
.tag{display:inline-block;padding:0 5px;border-radius:3px;background:#eef;margin-right:3px;
font-family:ui-monospace,monospace}.new{background:#fde2c8}.controls *{margin-right:10px}
.grid{display:flex;gap:2em;flex-wrap:wrap}
"""

INDEX_JS = r"""
(function(){
var data=JSON.parse(document.getElementById('dash-data').textContent);
var sel=document.getElementById('sae'),body=document.getElementById('rows'),head=document.getElementById('head');
var st={sae:0,col:null,desc:true};
data.saes.forEach(function(s,i){var o=document.createElement('option');o.value=i;o.textContent=s.label;sel.appendChild(o);});
function num(v){return typeof v==='number';}
function fmt(v,c){if(v===null||v===undefined)return '';if(!num(v))return String(v);
 if(c==='feature'||c==='nearest_gsae')return String(v);if(Math.abs(v)>=1e-3||v===0)return v.toPrecision(3);return v.toExponential(2);}
function cell(tr,v,c,s){var td=document.createElement('td');
 if(!s.pageSet)s.pageSet=new Set(s.pages||[]);
 if(c==='feature'&&s.pageSet.has(v)){var a=document.createElement('a');a.href='f/'+s.name+'/'+v+'.html';
  a.textContent=String(v);td.appendChild(a);}else{td.textContent=fmt(v,c);}
 if(num(v))td.className='n';tr.appendChild(td);}
function rows(){var s=data.saes[st.sae],cols=s.columns,ix={};cols.forEach(function(c,i){ix[c]=i;});
 var minf=parseFloat(document.getElementById('minfreq').value)||0,stat=document.getElementById('status').value,
 ex=document.getElementById('explained').value,q=document.getElementById('q').value.toLowerCase();
 var r=s.rows.filter(function(r){if(r[ix.freq_in]<minf)return false;if(stat!=='all'&&r[ix.status]!==stat)return false;
  var has=r[ix.explanation]!==null&&r[ix.explanation]!=='';if(ex==='yes'&&!has)return false;if(ex==='no'&&has)return false;
  if(q){var t=(String(r[ix.top_tokens])+' '+String(r[ix.logit_top])+' '+String(r[ix.explanation]||'')).toLowerCase();
   if(t.indexOf(q)<0)return false;}return true;});
 if(st.col!==null){var k=ix[st.col],d=st.desc?-1:1;r=r.slice().sort(function(a,b){var x=a[k],y=b[k];
  if(x===y)return 0;if(x===null)return 1;if(y===null)return -1;return (x<y?-1:1)*d;});}
 return r;}
function render(){var s=data.saes[st.sae];head.textContent='';var tr=document.createElement('tr');
 s.columns.forEach(function(c){var th=document.createElement('th');th.textContent=c+(st.col===c?(st.desc?' \u25bc':' \u25b2'):'');
  th.dataset.col=c;th.onclick=function(){if(st.col===c)st.desc=!st.desc;else{st.col=c;st.desc=true;}render();};tr.appendChild(th);});
 head.appendChild(tr);body.textContent='';var r=rows(),frag=document.createDocumentFragment();
 r.forEach(function(row){var tr=document.createElement('tr');row.forEach(function(v,i){cell(tr,v,s.columns[i],s);});frag.appendChild(tr);});
 body.appendChild(frag);document.getElementById('count').textContent=r.length+' of '+s.rows.length+' features';
 document.getElementById('meta').textContent=s.meta;}
sel.onchange=function(){st.sae=+sel.value;render();};
['minfreq','status','explained','q'].forEach(function(id){document.getElementById(id).oninput=render;});
render();
})();
"""
