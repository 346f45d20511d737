#!/usr/bin/env python3
"""Generate the two small sample datasets that ship with the project.

Why this exists
---------------
The demo recipes and the tests need realistic-looking, license-clean data
that anyone can rebuild without network access or a frontier-model API key.
This script writes it from hand-written templates, slot fillers and a fixed
random seed, using only the Python standard library:

* ``data/tickets/tickets.jsonl`` - customer-support messages for a fictional
  SaaS + e-commerce company, each labelled with one of five queues
  (classification task).
* ``data/orders/orders.jsonl`` - short customer messages about an order, each
  with a ``fields`` object to extract (structured-extraction task, validated
  against ``ORDER_SCHEMA``).

The text is synthetic: every message was produced by this script, no real
customer wrote it, and no real person, order or company is described.

How to re-run
-------------
From the repository root::

    python scripts/make_sample_data.py

The output is byte-identical on every run (fixed seed, sorted keys, one JSON
object per line, trailing newline).  Editing a template or a filler list
changes the data, so regenerate and commit the script and the files together.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

SEED = 20240611

ROOT = Path(__file__).resolve().parent.parent
TICKETS_PATH = ROOT / "data" / "tickets" / "tickets.jsonl"
ORDERS_PATH = ROOT / "data" / "orders" / "orders.jsonl"

# Rows per class. Tickets: 400 in total, orders: 300 in total.
QUEUE_COUNTS = {
    "billing": 82,
    "technical": 84,
    "account": 78,
    "shipping": 80,
    "returns": 76,
}
ISSUE_COUNTS = {
    "damaged": 64,
    "missing": 58,
    "late": 62,
    "wrong_item": 56,
    "other": 60,
}
ORDER_NULL_ID_FRACTION = 0.2
MAX_WORDS = 110

ISSUES = ["damaged", "missing", "late", "wrong_item", "other"]

# Extraction target for data/orders/orders.jsonl (JSON Schema, draft 2020-12).
ORDER_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "order_id": {"type": ["string", "null"], "pattern": "^[A-Z][0-9]{5}$"},
        "product": {"type": "string", "minLength": 1},
        "quantity": {"type": "integer", "minimum": 1},
        "issue": {"type": "string", "enum": ISSUES},
    },
    "required": ["order_id", "product", "quantity", "issue"],
    "additionalProperties": False,
}

# --------------------------------------------------------------------------
# Slot fillers
# --------------------------------------------------------------------------

# Products by kind, so that a template only names things it makes sense for
# ("stopped charging" needs a gadget, "size M" needs clothing).
GADGETS = [
    "wireless mouse", "mechanical keyboard", "USB-C hub", "webcam",
    "desk lamp", "bluetooth speaker", "coffee grinder", "air purifier",
    "electric kettle", "4K monitor", "external SSD", "label printer",
    "smart plug", "noise-cancelling headset",
]
FURNITURE = [
    "standing desk", "ergonomic chair", "monitor arm", "laptop stand",
    "office chair", "tablet stand", "bookshelf", "footrest",
]
HOUSEWARES = [
    "ceramic mug", "water bottle", "french press", "cast iron skillet",
    "wall clock", "phone case", "cable organizer", "glass teapot",
]
SOFT_GOODS = ["backpack", "yoga mat", "throw blanket", "desk mat"]
APPAREL = ["rain jacket", "hoodie", "fleece vest", "linen shirt", "denim jacket"]
PRODUCTS = GADGETS + FURNITURE + HOUSEWARES + SOFT_GOODS + APPAREL
HARD_GOODS = GADGETS + FURNITURE + HOUSEWARES
PRODUCT_POOLS = {
    "any": PRODUCTS,
    "hard": HARD_GOODS,
    "gadget": GADGETS,
    "assembly": FURNITURE + ["label printer", "air purifier"],
    "soft": SOFT_GOODS + APPAREL,
    "apparel": APPAREL,
}
FEATURES = [
    "dashboard", "reports page", "inventory module", "storefront editor",
    "analytics tab", "orders page", "invoice generator", "customer list",
    "product catalog", "settings page",
]
REPORT_PAGES = [
    "dashboard", "reports page", "analytics tab", "sales summary",
    "orders page", "inventory report",
]
MONTHS = ["January", "February", "March", "April", "May", "June", "July",
          "August", "September", "October", "November", "December"]
PLANS = ["Starter", "Pro", "Team", "Business", "Growth"]
BROWSERS = [
    "Chrome", "Chrome 124", "Firefox", "Safari", "Safari 17", "Edge",
    "Brave", "Firefox on Ubuntu",
]
DEVICES = [
    "iPhone 13", "iPhone 15", "Pixel 7", "Galaxy S22", "iPad", "iPad Air",
    "MacBook Air", "Android tablet", "Moto G", "OnePlus 9",
]
# Dates read naturally after "on", "since" and "from".
DATES = [
    "March 3", "the 14th", "Tuesday", "June 21", "Friday", "October 2",
    "the 1st", "Monday", "April 28", "May 9", "Thursday", "the 22nd",
    "January 17", "Sept 5", "the 9th", "November 30",
]
DEADLINES = [
    "March 3", "the 14th", "Friday", "June 21", "October 2", "Monday",
    "April 28", "May 9", "the 22nd", "Saturday", "my birthday",
    "the weekend",
]
AMOUNTS = [
    "$9.99", "$12.50", "$14.99", "$19.00", "$24.99", "$29.99", "$39.00",
    "$49.99", "$59.00", "$79.99", "$99.00", "$129.00", "$149.99", "$199.00",
    "$249.00", "$18.75", "$64.20", "$310.00",
]
CARRIERS = ["UPS", "FedEx", "USPS", "DHL"]
CITIES = [
    "Denver", "Austin", "Portland", "Toronto", "Leeds", "Phoenix",
    "Lisbon", "Chicago", "Sacramento", "Halifax", "Manila", "Kraków",
]
ERRORS = [
    "Error 500", "ERR_CONNECTION_RESET", "Something went wrong (code 4012)",
    "429 Too Many Requests", "502 Bad Gateway", "TypeError: undefined",
    "Request timed out", "403 Forbidden",
]
FIRST_NAMES = [
    "Maria", "Tom", "Priya", "Jonas", "Aisha", "Ken", "Sofia", "Dave",
    "Lucía", "Marek", "Grace", "Omar", "Hannah", "Wei", "Chloe", "Sam",
    "Raj", "Emma", "Luis", "Nora",
]
SURNAMES = [
    "kim", "patel", "novak", "smith", "garcia", "okafor", "lee", "brown",
    "schulz", "nguyen",
]
COLORS = ["black", "white", "grey", "navy", "sage green", "red", "oak", "walnut"]
PARTS = ["corner", "base", "edge", "side", "top", "bottom"]
VARIANTS = ["large", "small", "compact", "pro", "standard", "XL"]
ORDER_LETTERS = "ABCKMRTX"
AGENTS = ["Jess", "Mike", "Ana", "Ben", "Kayla"]
NUMBER_WORDS = {
    1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six",
    7: "seven", 8: "eight", 9: "nine", 10: "ten", 12: "twelve",
}

# --------------------------------------------------------------------------
# Ticket templates: 27+ per queue. "[a|b]" picks one alternative at random.
# Several are deliberately hard (keywords of another queue appear).
# --------------------------------------------------------------------------

TICKET_TEMPLATES = {
    "billing": [
        "I was charged {amount} twice on {date} for the {plan} plan. Can you refund the duplicate charge?",
        "Why did my bill go up to {amount} this month? I didn't change anything on my {plan} subscription.",
        "Need a copy of the invoice for {month} with our company VAT number on it, our accountant is asking.",
        "My card ending in {last4} was declined, but my bank says there's no problem on their end. How do I retry the payment?",
        "I downgraded from {plan} last month but I'm still being billed the old price of {amount}.",
        "Can I switch from monthly to annual billing and get the discount applied to the current period?",
        "I cancelled my subscription on {date} and still got charged {amount} today. Please reverse this.",
        "I can log in fine, but the [billing|invoices] page says I owe {amount}, which doesn't match the {amount2} on my bank statement.",
        "How do I update the credit card on file? The old one ending in {last4} expired.",
        "We added {seats} seats mid-cycle and the prorated charge looks wrong to me. Can someone explain the math?",
        "There's a charge of {amount} from you on my statement and I don't recognise it. What is it for?",
        "The promo code SAVE20 was supposed to take 20% off my plan but the invoice shows the full price, {amount}.",
        "Do you offer nonprofit pricing for the {plan} plan? We're a small charity and the current price is a stretch.",
        "Please send receipts to {email} instead of my personal address from now on.",
        "My free trial was supposed to end on {date} but I got billed {amount} before that.",
        "Is there a way to pay by bank transfer instead of card? Our finance team doesn't do cards.",
        "I got an email saying my payment failed, but my account still works and I can sign in. Do I need to do anything or will it retry automatically?",
        "We're tax exempt, can you remove sales tax from our invoices? I can send the certificate.",
        "You charged my card {amount} for an add-on I never turned on.",
        "I think we're paying for {seats} seats but only {n} people actually use it. Can you reduce it and credit the difference?",
        "Can I get a refund for the unused months of my annual {plan} plan? We're shutting the project down.",
        "The currency on my invoice changed from USD to EUR without warning and now I'm paying about {amount} more in fees.",
        "Can you split our invoice across two cost centres? Finance needs separate PO numbers.",
        "Our billing contact left the company. How do we change who receives the invoices and payment reminders?",
        "Your pricing page says {plan} is {amount} a month but I was charged {amount2}.",
        "The refund for the double charge from {date} still hasn't shown up. It's been {days} days.",
        "Is it possible to pause the subscription for [a couple of|two|three] months instead of cancelling?",
        "Checkout on order {order} charged me for shipping twice, {amount} each time. I'd like the extra one back.",
        "Got a 'payment method required' banner after upgrading to {plan}, but I already added a card.",
        "What does the line 'platform fee' on my last invoice mean? It wasn't there before {date}.",
    ],
    "technical": [
        "The {feature} keeps showing a blank page in {browser}. Cleared the cache, same thing.",
        "The app crashes as soon as I open it on my {device} since the last update.",
        "Getting '{error}' whenever I try to [export a CSV|download a PDF] from the {report}.",
        "Our API calls started failing with '{error}' around {date}. Nothing changed on our side.",
        "Calendar sync stopped working[ on {date}|], events I add aren't showing up in [Google Calendar|Outlook] anymore.",
        "The [Slack|Teams] integration posts every [notification|new order alert] twice.",
        "It takes 30+ seconds to load the [product catalog|inventory module|orders page] for our store with about {n}000 products.",
        "Images I upload in the storefront editor come out blurry and pixelated, even at full resolution.",
        "Webhook for new orders isn't firing. I can see order {order} in the dashboard but our endpoint never received it.",
        "Dark mode makes the text on the {feature} unreadable, it's white on light grey.",
        "Push notifications stopped on my {device}. They're enabled in the phone settings.",
        "When I click Save on the {feature} nothing happens. No error, just nothing. Using {browser}.",
        "Search in the dashboard doesn't find products with accents in the name, e.g. 'café'.",
        "Our inventory counts are off after the sync ran last night. {n} items now show negative stock.",
        "Can't log in on the mobile app on my {device}, it just spins forever on the splash screen. Web login works fine.",
        "The PDF invoices your system generates show the wrong time zone, everything is off by a few hours.",
        "Numbers on the {report} don't match the CSV export for {month}.",
        "Getting a CORS error when embedding the checkout widget on our website.",
        "The product import fails at row {n} with no explanation.",
        "Since {date} the mobile app shows 'network error' every time I switch from wifi to mobile data.",
        "Keyboard shortcuts stopped working in {browser}.",
        "Is there an outage? The {feature} throws '{error}' for everyone on our team.",
        "The barcode scanner in the app won't focus on my {device}, camera permission is granted.",
        "Your API docs say /orders supports pagination but the cursor param seems to be ignored.",
        "Order confirmation emails to our customers are going out with broken links.",
        "After the update the {report} only shows yesterday's data, like it's stuck on a cached version.",
        "The rate limit seems way lower than documented, we hit '{error}' after roughly {n}0 requests a minute.",
        "Discount codes created via the API don't apply at checkout, but ones made in the UI do.",
        "The {report} freezes my whole tab in {browser} when I filter by date.",
    ],
    "account": [
        "I can't log in and the password reset email never arrives. Already checked spam.",
        "Please change the email on my account from {email} to a new one, I no longer have access to the old inbox.",
        "I got a new phone and lost my two-factor codes. How do I get back into my account?",
        "How do I [delete|permanently close] my account and all my data?[ I won't be using it anymore.|]",
        "Someone on my team left. How do I remove them and transfer their projects to me?",
        "My account got locked after too many login attempts. It's been over an hour.",
        "I accidentally signed up twice with different emails. Can you merge the two accounts?",
        "How do I give our accountant read-only access without letting them change anything?",
        "Got an alert about a login from {city} that wasn't me. Please help me secure my account.",
        "Can I change my username? It still shows my old company name.",
        "How do I resend an invitation to a new team member? The one I sent on {date} expired.",
        "We want to set up SSO with Okta for our workspace, where do I start?",
        "I'm the account owner but I can't see the Admin settings anymore.",
        "Please update the name on my account, I got married and my last name changed.",
        "I need to update my payment card but I can't even sign in, it says there's no account for {email}.",
        "How do I turn off marketing emails but keep getting order notifications?",
        "Can I have two separate workspaces under one login?",
        "The reset password link takes me to a page that says the token is invalid.",
        "My account was deactivated and I don't know why. I paid my last invoice on {date}.",
        "Please make {email} an admin on our workspace. I'm the owner.",
        "If I close my account, what happens to my order history? I want to keep the records for order {order}.",
        "I never signed up for your service but I keep getting account emails at {email}.",
        "How do I download a copy of all my personal data? This is a GDPR request.",
        "I changed my phone number and now the SMS verification code goes to the old one.",
        "Can I convert my personal account to a business account without losing my saved addresses?",
        "Checking out as a guest seems to have created an account for me. I'd like it removed.",
        "Sign in with Google stopped working, it says the account is already linked to another user.",
        "A former employee is still listed as the workspace owner and we can't remove them.",
        "How do I change which email address I use to log in? I want to use {email}.",
    ],
    "shipping": [
        "Where is my order {order}? Tracking hasn't updated since {date}.",
        "Tracking says delivered [yesterday|this morning|on {date}] but there's no package at my door[ or with the neighbours| or in the mailroom|]. [Can you look into it?|What now?|Help?]",
        "Can I change the delivery address for order {order}? I just moved to {city}.",
        "Do you ship to [Canada|the UK|Australia|Mexico|Germany], and how long does it usually take?",
        "My {product} was supposed to arrive {date} and it's still not here.",
        "The {carrier} tracking number you sent says 'label created' and nothing else for {days} days now.",
        "Can I upgrade to [express|overnight|next-day] shipping after placing the order?",
        "My package is stuck in customs. Do I need to pay something to get it released?",
        "Only part of my order arrived, the {product} wasn't in the box. Is it coming separately?",
        "Can you hold my package at the {carrier} location instead of leaving it outside?",
        "{carrier} shows 'delivery exception' for order {order}, what does that mean?",
        "The {product} has been on backorder since {date}. Any idea when it will actually ship?",
        "Why is shipping {amount} for {product_a}? That seems really high before I place the order.",
        "I need the {product} by {deadline} for a gift. Is that still possible if I order today?",
        "The driver left my package at the wrong house, the delivery photo isn't my porch.",
        "Order {order} shows two tracking numbers, one delivered and one not moving. Did it ship in two boxes?",
        "Can I pick up my order in person instead of having it shipped? I'm [in {city}|close to your warehouse|local].",
        "The box arrived torn open and taped back up by the carrier. Everything seems to be there but I wanted to let you know.",
        "I'm away from {date} for two weeks, can you hold off shipping my order until I'm back?",
        "{carrier} couldn't deliver my package and says it's being returned to sender. Can you reship it to me?",
        "Do you deliver on [weekends|Saturdays|public holidays]? [Need to know before I order.|I'm only home then.|]",
        "The estimated delivery date keeps moving. First it was {date}, now it's a week later.",
        "Does order {order} need a signature? I won't be home during the day.",
        "I typed my apartment number wrong on order {order}, it should be Apt {n}B.",
        "Has my order shipped yet? I ordered the {product} {days} days ago and never got a shipping confirmation.",
        "Is it possible to ship to a [PO box|parcel locker|hotel]? [I'm not always home.|]",
        "Tracking shows my package went to {city}, which is not where I live. Is it lost?",
        "Can you combine my two orders into one shipment? The second one is {order}.",
        "The tracking link in the shipping email goes to a 404 page on the {carrier} site.",
    ],
    "returns": [
        "I'd like to return the {product} from order {order}, [it's smaller than I expected|it doesn't suit my space|I don't need it anymore].",
        "How do I get a return label? The {hard} arrived with a cracked {part}.",
        "I sent back the {product} on {date} and still haven't gotten my refund of {amount}.",
        "Can I exchange the {apparel} for a different [colour|size]?",
        "What's your return window? I bought {product_a} about {days} days ago and never opened it.",
        "The {gadget} stopped working after a week. I want to send it back for a replacement.",
        "My return was marked as received {days} days ago but {amount} still hasn't been credited to my card.",
        "I received {product_a} that I didn't order. How do I send it back?",
        "Do I have to pay for return shipping [or is it free|on the {product}|if the item was faulty]?",
        "The gift I received doesn't fit. Can I return it without a receipt?",
        "The return label you emailed won't scan at the {carrier} store.",
        "I'd like to return part of order {order}, just the {product}, and keep the rest.",
        "Can I return an item I bought on sale for {amount}?",
        "The {product} I got is nothing like the photos, the colour is completely different. I'd like my money back.",
        "I dropped the return off at {carrier} but tracking still says label created. Just want to be sure you'll get it.",
        "Can the refund go to store credit instead of my card? I'm returning the {product}.",
        "My return was rejected because the box was opened?? It's {product_a}, how was I supposed to check it without opening it?",
        "Changed my mind about the {product}, it's still in the original packaging. How do I start a return?",
        "Exchange request: {apparel} size [M for size L|S for size M|L for size XL], order {order}.",
        "Warranty claim: the {gadget} [broke|cracked|stopped charging|started rattling] after two months of normal use.",
        "The refund for my return was {amount} but I paid {amount2}. Where is the rest?",
        "I lost the return label, can you resend it to {email}?",
        "Can I return items from two different orders in one box? [One of them is {order}.|Trying to save a trip to the post office.|]",
        "The {hard} arrived with a dent on the side. I want to send it back, not get a replacement.",
        "I sent back the wrong item by mistake, the {product2} instead of the {product}. How do we fix this?",
        "The returns portal says order {order} isn't eligible for return. Why?",
        "Do you offer a free return pickup or do I need to take it to the post office?",
        "It's been {days} days since I shipped my return and nobody has confirmed it arrived.",
        "Bought the {product} for {amount} and it's already cheaper on your site. Can I return it and rebuy, or can you match the price?",
    ],
}

OPENERS = [
    "Hi,", "Hello,", "Hi there,", "Hey -", "Hello team,", "Good morning,",
    "Hi support,", "To whom it may concern,", "Hey,", "Good afternoon,",
    "Hi {agent},", "Dear support team,", "Hi again {agent},",
]
CLOSERS = [
    "Thanks!", "Thank you.", "Thanks in advance.", "Cheers, {name}",
    "Best, {name}", "Regards, {name}", "Please advise.", "Thx",
    "Appreciate the help.", "Thanks, {name}", "- {name}",
    "Let me know what you need from me.",
]
ANGRY_BEFORE = [
    "This is the second time I'm writing about this.",
    "Nobody has replied to my last two emails.",
    "Third time asking.",
    "Seriously?",
]
ANGRY_AFTER = [
    "Honestly really disappointed.",
    "Please fix this ASAP!!",
    "I'm about ready to take my business elsewhere.",
    "Not happy at all.",
    "This is ridiculous.",
    "I expect a real answer this time, not a canned reply.",
]
RAMBLE_BEFORE = [
    "Not sure if this is the right place to ask, sorry.",
    "I've been a customer for years and never had a problem before.",
    "I tried looking in the help center first but couldn't find anything.",
    "My colleague said I should write in about this.",
    "I'm not very technical so bear with me.",
    "I'm writing this from my phone so excuse any mistakes.",
]
RAMBLE_AFTER = [
    "Sorry for the long message, I just want to get this sorted.",
    "Anyway, hope you can help.",
    "It's not urgent but it's been bugging me.",
    "Let me know if you need screenshots or anything else.",
]
TICKET_TYPOS = {
    "receive": "recieve", "received": "recieved", "definitely": "definately",
    "separate": "seperate", "account": "acount", "address": "adress",
    "payment": "paymnet", "because": "becuase", "already": "allready",
    "until": "untill", "which": "wich", "their": "thier",
    "package": "pakage", "shipping": "shiping", "please": "pls", "thanks": "thx", "anything": "anythign",
    "working": "workign", "invoice": "invioce", "delivery": "delivry",
    "return": "retrun", "refund": "refnud", "still": "stil",
}

# --------------------------------------------------------------------------
# Order templates (40 in total). Slots:
#   {item}    noun phrase for the product incl. quantity, e.g. "the webcam",
#             "3 x webcam", "two units of the webcam"
#   {ORD}     "order #A12345" / "order A12345" / ... or just "order" when the
#             row has no order number
#   {Item}    {item} with a capital letter, for the start of a sentence
#   {was} {is} {has} {it} {them}   agreement with {item}
#   {other_a} another product with an article (wrong_item only)
# --------------------------------------------------------------------------

ORDER_TEMPLATES = {
    # (product pool, template)
    "damaged": [
        ("hard", "My {ORD} arrived today and {item} {was} [cracked|smashed|dented|scratched all over]."),
        ("hard", "{Item} came with a [broken|snapped|cracked] {part}. The box looked fine from the outside. Can you send a replacement?"),
        ("hard", "Unboxed {item} from my {ORD} and {it} {was} damaged - [a deep scratch across the top|a big dent in the side|a chunk missing from one corner]."),
        ("hard", "The box was crushed and {item} inside {was} broken. Photos attached."),
        ("hard", "Received {item} but {it} {is} damaged, there's a [crack|chip|dent] right on the front. Not great for {price}."),
        ("any", "Damaged on arrival: {item}. [Looks like the courier dropped it.|Packaging was wrecked.|Not usable like this.]"),
        ("gadget", "Just got {item} and the casing is cracked, looks like shipping damage. [It won't even turn on.|It rattles when I shake it.|]"),
        ("any", "{item} from my {ORD} showed up with water damage, the packaging was soaked through"),
        ("hard", "{Item} arrived in pieces. I'd like a replacement please."),
        ("soft", "{Item} arrived [torn along the seam|with a big stain on it|with a hole in it]. [Can I get a replacement?|Is this how it ships?|Please replace it.]"),
    ],
    "missing": [
        ("any", "My {ORD} was delivered but {item} {was} not in the box. Everything else was there."),
        ("any", "The package arrived without {item}. The packing slip lists {it} but {it} {is} not there."),
        ("any", "I opened my {ORD} and {item} {is} missing. Can you check?"),
        ("any", "Got the box on {date} but {item} {was} not inside, just packing paper."),
        ("any", "Tracking says delivered and the box is here, but {item} {is} missing from it."),
        ("any", "My {ORD} came in two boxes and {item} {was} in neither. Where did {it} go?"),
        ("any", "Missing item: {item}. The rest of the order arrived fine."),
        ("any", "The {ORD} I got on {date} didn't include {item}, please send {them} asap."),
    ],
    "late": [
        ("any", "My {ORD} was supposed to arrive by {deadline} and {item} still {has} not shown up."),
        ("any", "It's been {days_late} days since I ordered {item} and the tracking hasn't moved."),
        ("any", "Still waiting on {item}. {carrier} tracking has said 'in transit' for over a week."),
        ("any", "When will {item} get here? The confirmation for my {ORD} said 5 business days and that was {days_late} days ago."),
        ("any", "{Item} {is} late. I needed {them} for {deadline}."),
        ("any", "Just checking on my {ORD}. {Item} {has} not arrived yet and we're well past the estimated delivery date."),
        ("any", "Ordered {item} on {date}, estimated delivery was 3-5 days, nothing yet. What's going on?"),
        ("any", "my {ORD} is delayed again?? {item} {was} promised by {deadline}"),
    ],
    "wrong_item": [
        ("any", "I ordered {item} but received {other_a} instead."),
        ("any", "Wrong item in my {ORD}: got {other_a} instead of {item}."),
        ("any", "The box had {other_a} in it. I ordered {item}."),
        ("any", "You sent the wrong colour. I ordered {item} in {color} and got {color2}."),
        ("any", "I think there was a mix-up with my {ORD}. Instead of {item} I got {other_a}, which I definitely didn't order."),
        ("hard", "Received {item} but {it} {is} the wrong model, I picked the {variant} version."),
        ("any", "The packing slip says {item} but what's actually inside is {other_a}."),
        ("any", "Got someone else's stuff? My {ORD} should be {item}, but it's {other_a}."),
        ("apparel", "I ordered {item} in size [M|L|S] but the label says [XL|XS|XXL]."),
    ],
    "other": [
        ("any", "Can I change the shipping address on my {ORD}? I'm sending {item} as a gift."),
        ("any", "Could you send me an invoice for {item}? I need it for my expense report."),
        ("any", "I'd like to cancel {item} from my {ORD} before it ships."),
        ("hard", "Is there a warranty on {item}? I just placed my {ORD}."),
        ("any", "Is it possible to add gift wrap to {item} in my {ORD}?"),
        ("any", "The discount code didn't apply when I bought {item}. Can you adjust the price?"),
        ("assembly", "How do I [assemble|set up] {item}? The instructions link in the manual goes nowhere."),
        ("any", "Can I switch {item} to the {color} version before my {ORD} ships?"),
    ],
}
ORDER_OPENERS = ["Hi,", "Hello,", "Hi there,", "Hey,", "Good morning,", "Hello team,"]
ORDER_CLOSERS = [
    "Thanks!", "Thank you.", "Thanks, {name}", "Cheers, {name}",
    "- {name}", "Please let me know.", "Thx", "Regards, {name}",
]
ORDER_EXTRAS = [
    "First time ordering from you.",
    "Can someone get back to me today?",
    "I'd rather not wait another week.",
    "Really frustrating.",
    "Hope this is easy to sort out.",
]
NULL_ID_NOTES = [
    "I can't find my order number, sorry.",
    "I don't have the order number handy.",
    "Ordered under {email}.",
    "The order is under my email, {email}.",
]
ID_SUFFIXES = [
    "Order number is {oid}.", "Order #{oid}.", "(order {oid})",
    "Ref: {oid}", "My order number: {oid}.",
]
ID_PREFIXES = ["Order #{oid} - ", "Re: order {oid}. ", "{oid}: ", "Order {oid}: "]
ORDER_TYPOS = {
    "received": "recieved", "definitely": "definately", "already": "allready",
    "package": "pakage", "please": "pls", "because": "becuase",
    "still": "stil", "arrived": "arived", "thanks": "thx", "the box": "teh box",
}

ALT_RE = re.compile(r"\[([^\[\]]*)\]")
ORDER_ID_RE = re.compile(r"[A-Z][0-9]{5}")


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


class DataError(ValueError):
    """A generated row breaks one of the dataset's guarantees."""


def require(condition: object, detail: object = "") -> None:
    """Like ``assert`` but also active under ``python -O``."""
    if not condition:
        raise DataError(str(detail))


def expand_alternatives(rng: random.Random, template: str) -> str:
    """Replace every "[a|b|c]" with one alternative (an empty one is allowed)."""
    text = ALT_RE.sub(lambda m: rng.choice(m.group(1).split("|")), template)
    return re.sub(r" {2,}", " ", text).strip()


def with_article(noun: str) -> str:
    vowel_sound = noun[0].lower() in "aeiou" and not noun.startswith(("USB", "us", "un"))
    article = "an" if vowel_sound else "a"
    return f"{article} {noun}"


def cap_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def word_count(text: str) -> int:
    return len(text.split())


def make_email(rng: random.Random) -> str:
    name = rng.choice(FIRST_NAMES).lower()
    name = name.replace("í", "i")
    sep = rng.choice([".", "_", ""])
    domain = rng.choice(["example.com", "example.org", "example.net"])
    return f"{name}{sep}{rng.choice(SURNAMES)}@{domain}"


def make_order_id(rng: random.Random) -> str:
    return rng.choice(ORDER_LETTERS) + f"{rng.randrange(10000, 100000)}"


def apply_typo(rng: random.Random, text: str, table: dict[str, str]) -> str:
    """Introduce one realistic typo: a known misspelling or two swapped letters."""
    candidates = [w for w in table if re.search(rf"\b{re.escape(w)}\b", text, re.IGNORECASE)]
    if candidates and rng.random() < 0.75:
        word = rng.choice(candidates)
        pattern = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)

        def repl(m: re.Match[str]) -> str:
            bad = table[word]
            return cap_first(bad) if m.group(0)[0].isupper() else bad

        return pattern.sub(repl, text, count=1)
    words = [m for m in re.finditer(r"\b[a-z]{5,}\b", text)]
    if not words:
        return text
    m = rng.choice(words)
    w = m.group(0)
    i = rng.randrange(1, len(w) - 2)
    w2 = w[:i] + w[i + 1] + w[i] + w[i + 2:]
    return text[: m.start()] + w2 + text[m.end():]


def common_slots(rng: random.Random) -> dict[str, str]:
    amount, amount2 = rng.sample(AMOUNTS, 2)
    product, product2 = rng.sample(PRODUCTS, 2)
    return {
        "product_a": with_article(product),
        "gadget": rng.choice(GADGETS),
        "hard": rng.choice(HARD_GOODS),
        "apparel": rng.choice(APPAREL),
        "report": rng.choice(REPORT_PAGES),
        "month": rng.choice(MONTHS),
        "agent": rng.choice(AGENTS),
        "amount": amount,
        "amount2": amount2,
        "plan": rng.choice(PLANS),
        "product": product,
        "product2": product2,
        "feature": rng.choice(FEATURES),
        "browser": rng.choice(BROWSERS),
        "device": rng.choice(DEVICES),
        "date": rng.choice(DATES),
        "deadline": rng.choice(DEADLINES),
        "last4": f"{rng.randrange(0, 10000):04d}",
        "carrier": rng.choice(CARRIERS),
        "days": str(rng.choice([3, 4, 5, 6, 8, 9, 10, 12, 14, 16, 21])),
        "days_late": str(rng.choice([9, 10, 11, 12, 14, 16, 18, 21, 25])),
        "email": make_email(rng),
        "error": rng.choice(ERRORS),
        "city": rng.choice(CITIES),
        "n": str(rng.randrange(2, 13)),
        "seats": str(rng.choice([5, 8, 10, 12, 15, 20, 25, 40])),
        "order": "#" + make_order_id(rng),
        "part": rng.choice(PARTS),
        "name": rng.choice(FIRST_NAMES),
    }


# --------------------------------------------------------------------------
# Tickets
# --------------------------------------------------------------------------


def render_ticket(rng: random.Random, template: str) -> str:
    slots = common_slots(rng)
    core = expand_alternatives(rng, template).format_map(slots)
    style = rng.random()
    parts: list[str] = []
    if style < 0.12:  # terse: no greeting, lower case, no final period
        text = core.lower().rstrip(".")
        if rng.random() < 0.3:
            text += rng.choice(["", " thx", " pls help", "??"])
        text = text.strip()
    else:
        if style < 0.24:  # angry
            if rng.random() < 0.4:
                parts.append(rng.choice(ANGRY_BEFORE))
            parts.append(core)
            if len(parts) == 1 or rng.random() < 0.4:
                parts.append(rng.choice(ANGRY_AFTER))
        elif style < 0.40:  # rambling
            if rng.random() < 0.7:
                parts.append(rng.choice(RAMBLE_BEFORE))
            parts.append(core)
            if len(parts) == 1 or rng.random() < 0.5:
                parts.append(rng.choice(RAMBLE_AFTER))
        else:
            parts.append(core)
        text = " ".join(parts)
        # Greetings and sign-offs, sometimes on their own line as in an email.
        if rng.random() < 0.35:
            text = rng.choice(OPENERS).format_map(slots) + rng.choice([" ", " ", "\n"]) + text
        if rng.random() < 0.4:
            text = text + rng.choice([" ", " ", "\n"]) + rng.choice(CLOSERS).format_map(slots)
        if rng.random() < 0.06:
            text = text.rstrip(".")
    if rng.random() < 0.15:
        text = apply_typo(rng, text, TICKET_TYPOS)
    return text


def make_tickets(rng: random.Random) -> list[dict]:
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    for queue, count in QUEUE_COUNTS.items():
        templates = TICKET_TEMPLATES[queue]
        require(len(templates) >= 25, (queue, len(templates)))
        require(len(set(templates)) == len(templates), queue)
        order = list(templates)
        made = 0
        i = 0
        attempts = 0
        while made < count:
            if i % len(order) == 0:
                rng.shuffle(order)
            template = order[i % len(order)]
            i += 1
            attempts += 1
            require(attempts < count * 20, f"cannot make enough unique tickets for {queue}")
            text = render_ticket(rng, template)
            if text in seen:
                i -= 1  # retry the same template with new slots
                continue
            require(word_count(text) <= MAX_WORDS, text)
            seen.add(text)
            rows.append((queue, text))
            made += 1
    rng.shuffle(rows)
    out = []
    for idx, (queue, text) in enumerate(rows, start=1):
        out.append({"id": f"t{idx:04d}", "text": text, "queue": queue})
    return out


# --------------------------------------------------------------------------
# Orders
# --------------------------------------------------------------------------


def pick_quantity(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.55:
        return 1
    if r < 0.77:
        return 2
    if r < 0.88:
        return 3
    return rng.choice([4, 5, 6, 10, 12])


def item_phrase(rng: random.Random, product: str, qty: int) -> tuple[str, bool, str]:
    """Noun phrase naming the product and quantity.

    Returns (phrase, plural, trailing sentence stating the quantity or "").
    """
    word = NUMBER_WORDS[qty]
    if qty == 1:
        r = rng.random()
        if r < 0.75:
            return rng.choice(["the", "my", "the", "my"]) + f" {product}", False, ""
        if r < 0.9:
            return rng.choice([f"one {product}", f"1 x {product}", f"a single {product}"]), False, ""
        return f"the {product}", False, rng.choice(["Qty 1.", "Quantity: 1.", "Just one unit."])
    r = rng.random()
    if r < 0.7:
        phrase = rng.choice([
            f"{qty} x {product}", f"{qty}x {product}", f"{qty} units of the {product}",
            f"{word} units of the {product}",
        ] + ([f"all {word} units of the {product}"] if qty >= 3 else []))
        return phrase, True, ""
    trailing = rng.choice([
        f"I ordered {word} of these.", f"Quantity: {qty}.", f"(I bought {qty}.)",
        f"There were {word} in the order.", f"Qty {qty}.",
    ])
    return f"the {product}", False, trailing


def end_sentence(text: str) -> str:
    return text if text[-1:] in ".!?)" else text + "."


def render_order(
    rng: random.Random, pool: str, template: str, issue: str, has_id: bool
) -> tuple[str, dict]:
    slots = common_slots(rng)
    product = rng.choice(PRODUCT_POOLS[pool])
    other = rng.choice([p for p in PRODUCTS if p != product and p not in product and product not in p])
    qty = pick_quantity(rng)
    item, plural, trailing = item_phrase(rng, product, qty)
    oid = make_order_id(rng) if has_id else None
    if oid is not None:
        ord_phrase = rng.choice([
            f"order #{oid}", f"order {oid}", f"order no. {oid}", f"order number {oid}", f"order ({oid})",
        ])
    else:
        ord_phrase = "order"
    color, color2 = rng.sample(COLORS, 2)
    slots.update({
        "item": item,
        "Item": cap_first(item),
        "ORD": ord_phrase,
        "was": "were" if plural else "was",
        "is": "are" if plural else "is",
        "has": "have" if plural else "has",
        "it": "they" if plural else "it",
        "them": "them" if plural else "it",
        "other_a": with_article(other),
        "color": color,
        "color2": color2,
        "variant": rng.choice(VARIANTS),
        "price": slots["amount"],
    })
    core = cap_first(expand_alternatives(rng, template).format_map(slots))
    parts: list[str] = []
    if oid is not None and "{ORD}" not in template:
        where = rng.random()
        if where < 0.45:
            core = rng.choice(ID_PREFIXES).format(oid=oid) + core
        else:
            core = end_sentence(core) + " " + rng.choice(ID_SUFFIXES).format(oid=oid)
    if rng.random() < 0.3:
        parts.append(rng.choice(ORDER_OPENERS))
    parts.append(core)
    if trailing:
        parts[-1] = end_sentence(parts[-1])
        parts.append(trailing)
    if oid is None and rng.random() < 0.35:
        parts[-1] = end_sentence(parts[-1])
        parts.append(rng.choice(NULL_ID_NOTES).format_map(slots))
    if rng.random() < 0.12:
        parts[-1] = end_sentence(parts[-1])
        parts.append(rng.choice(ORDER_EXTRAS))
    if rng.random() < 0.3:
        parts[-1] = end_sentence(parts[-1])
        parts.append(rng.choice(ORDER_CLOSERS).format_map(slots))
    text = " ".join(parts)
    if rng.random() < 0.12:
        typo = apply_typo(rng, text, ORDER_TYPOS)
        if product in typo and (oid is None or oid in typo) and _qty_text_intact(text, typo, qty):
            text = typo
    fields = {"order_id": oid, "product": product, "quantity": qty, "issue": issue}
    return text, fields


def _qty_text_intact(before: str, after: str, qty: int) -> bool:
    """A typo must not touch the words that state the quantity."""
    for token in (str(qty), NUMBER_WORDS[qty]):
        if before.count(token) != after.count(token):
            return False
    return True


def validate_fields(fields: object) -> None:
    """Hand-written check of ``fields`` against ORDER_SCHEMA (no dependencies)."""
    schema = ORDER_SCHEMA
    require(isinstance(fields, dict), fields)
    keys = set(fields)
    require(keys >= set(schema["required"]), f"missing keys: {set(schema['required']) - keys}")
    if schema["additionalProperties"] is False:
        require(keys <= set(schema["properties"]), f"extra keys: {keys - set(schema['properties'])}")
    oid = fields["order_id"]
    pattern = schema["properties"]["order_id"]["pattern"]
    require(oid is None or (isinstance(oid, str) and re.search(pattern, oid) is not None), oid)
    product = fields["product"]
    require(isinstance(product, str) and len(product) >= schema["properties"]["product"]["minLength"], product)
    qty = fields["quantity"]
    require(isinstance(qty, int) and not isinstance(qty, bool), qty)
    require(qty >= schema["properties"]["quantity"]["minimum"], qty)
    require(fields["issue"] in schema["properties"]["issue"]["enum"], fields["issue"])


def check_recoverable(text: str, fields: dict) -> None:
    """The extraction target must be readable off the text."""
    require(fields["product"] in text, (fields["product"], text))
    ids = ORDER_ID_RE.findall(text)
    if fields["order_id"] is None:
        require(not ids, text)
    else:
        require(ids == [fields["order_id"]], (ids, text))
    qty = fields["quantity"]
    if qty > 1:
        require(re.search(rf"(?<![0-9.$]){qty}(?![0-9])|\b{NUMBER_WORDS[qty]}\b", text, re.IGNORECASE), text)


def make_orders(rng: random.Random) -> list[dict]:
    total = sum(ISSUE_COUNTS.values())
    n_null = round(total * ORDER_NULL_ID_FRACTION)
    has_id_flags = [False] * n_null + [True] * (total - n_null)
    rng.shuffle(has_id_flags)
    all_templates = [t for ts in ORDER_TEMPLATES.values() for _, t in ts]
    require(len(all_templates) >= 20, len(all_templates))
    require(len(set(all_templates)) == len(all_templates), "duplicate order template")
    rows: list[tuple[str, dict]] = []
    seen: set[str] = set()
    flag_i = 0
    for issue in ISSUES:
        count = ISSUE_COUNTS[issue]
        templates = list(ORDER_TEMPLATES[issue])
        made = 0
        i = 0
        attempts = 0
        while made < count:
            if i % len(templates) == 0:
                rng.shuffle(templates)
            pool, template = templates[i % len(templates)]
            i += 1
            attempts += 1
            require(attempts < count * 20, f"cannot make enough unique orders for {issue}")
            text, fields = render_order(rng, pool, template, issue, has_id_flags[flag_i])
            if text in seen:
                i -= 1
                continue
            validate_fields(fields)
            check_recoverable(text, fields)
            require(word_count(text) <= MAX_WORDS, text)
            seen.add(text)
            rows.append((text, fields))
            made += 1
            flag_i += 1
    rng.shuffle(rows)
    return [
        {"id": f"o{idx:04d}", "text": text, "fields": fields}
        for idx, (text, fields) in enumerate(rows, start=1)
    ]


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(row, ensure_ascii=False, sort_keys=True) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")


def optional_jsonschema_check(rows: list[dict]) -> str:
    """Cross-check with the jsonschema package when it happens to be installed."""
    try:
        import jsonschema  # type: ignore[import-not-found]
    except ImportError:
        return "jsonschema not installed; hand-written check only"
    validator = jsonschema.Draft202012Validator(ORDER_SCHEMA)
    jsonschema.Draft202012Validator.check_schema(ORDER_SCHEMA)
    for row in rows:
        validator.validate(row["fields"])
    return "jsonschema Draft202012Validator: all rows valid"


def main() -> int:
    rng = random.Random(SEED)
    tickets = make_tickets(rng)
    orders = make_orders(rng)

    texts = [r["text"] for r in tickets]
    require(len(set(texts)) == len(texts), "duplicate ticket text")
    texts = [r["text"] for r in orders]
    require(len(set(texts)) == len(texts), "duplicate order text")

    write_jsonl(TICKETS_PATH, tickets)
    write_jsonl(ORDERS_PATH, orders)

    queues = Counter(r["queue"] for r in tickets)
    issues = Counter(r["fields"]["issue"] for r in orders)
    null_ids = sum(1 for r in orders if r["fields"]["order_id"] is None)
    print(f"wrote {TICKETS_PATH.relative_to(ROOT)}: {len(tickets)} rows")
    for q in QUEUE_COUNTS:
        print(f"  {q:<10} {queues[q]}")
    print(f"wrote {ORDERS_PATH.relative_to(ROOT)}: {len(orders)} rows "
          f"({null_ids} with order_id null)")
    for i in ISSUES:
        print(f"  {i:<10} {issues[i]}")
    print(optional_jsonschema_check(orders))
    return 0


if __name__ == "__main__":
    sys.exit(main())
